"""The comparison regularisers of the paper's Fig. 2, as the train step and network see them.

A :class:`Regularizer` changes training in at most two places: the network's task heads
(``heads``: PTA's decoders, ``dgr_jax.pta``) and the way the step takes its gradient
(``gradient``: SAM's ascent point). ``make_train_step(..., regularizer=...)`` reads
``gradient``; the network is built with ``regularizer.network(net)`` before the state and
the step. DGR itself is not one of these: it is a penalty in the objective
(``objective.DGRConfig``), and SRDML will be another.

**SAM** (Foret et al., ICLR 2021, "Sharpness-Aware Minimization"). With ``g`` the step's
gradient of the encoder and heads at ``w`` -- *after* the MTL method's combination, so SAM
composes with every method, loss weighting or gradient surgery -- the ascent point is
``w + rho g / ||g||`` (one step of the inner maximisation, rho = 0.05 the paper's default)
and the gradient applied at ``w`` is the step's gradient at the ascent point, taken by the
same function: two passes of one gradient computation, one branch for every method.

Why not ``optax.contrib.sam``: it alternates an adversarial and an outer optimizer over
successive ``update`` calls (or, opaque, calls a ``grad_fn(params, step)`` that must return
plain gradients), so the step's other outputs -- the MTL method's state, BatchNorm's
running statistics, the per-task losses -- have no way out of the adversarial pass, and
its normalisation would run over every optimised leaf (the method's parameters too) rather
than over the model. Ours wraps the step's gradient function instead, so the train step
stays one pure ``step(state, batch)``.

What SAM keeps from its two passes: everything the step reports or stores -- the task
losses and weights, the metrics, BatchNorm's running statistics and the MTL method's
state -- comes from the pass at ``w``, the parameters the state holds (the widely used
PyTorch SAM reports the first pass's loss and freezes BatchNorm's running statistics in
the second pass); only the gradient comes from the ascent point. Both passes see the same batch and dropout key and start from the same
method state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

PyTree = Any
# gradient_at(model_params) -> (grads, kept): the step's gradient at ``model_params``
# ({"encoder", "heads"}) with everything the step keeps from that pass.
GradientFn = Callable[[PyTree], tuple[PyTree, Any]]

DEFAULT_SAM_RHO = 0.05


class Regularizer(NamedTuple):
    """``heads``: maps the network's heads module to the regularised one (None: unchanged).
    ``gradient(gradient_at, model_params) -> (grads, kept, metrics)``: how the step takes
    its gradient from ``gradient_at`` (None: one pass at the parameters)."""

    heads: Callable[[Any], Any] | None = None
    gradient: Callable[[GradientFn, PyTree], tuple[PyTree, Any, dict]] | None = None

    def network(self, net):
        """``net`` (a ``MultiTaskNet``) with this regulariser's heads."""
        return net if self.heads is None else net.clone(heads=self.heads(net.heads))


def sam_gradient(gradient_at: GradientFn, model_params: PyTree, *, rho: float):
    """SAM's gradient: ``gradient_at`` at ``w + rho g/||g||``, ``g`` its value at ``w``.

    ``g``'s norm is over the model (``grads["encoder"]`` and ``grads["heads"]``); a zero
    gradient leaves the ascent point at ``w``. Returns ``(grads at the ascent point, kept
    from the pass at w, {"sam/grad_norm": ||g||})``."""
    grads, kept = gradient_at(model_params)
    g = {"encoder": grads["encoder"], "heads": grads["heads"]}
    norm = optax.tree.norm(g)
    scale = rho / jax.numpy.where(norm > 0, norm, 1.0)
    ascent = jax.tree_util.tree_map(
        lambda w, d: w + (scale * d).astype(w.dtype),
        model_params,
        jax.lax.stop_gradient(g),
    )
    ascent_grads, _ = gradient_at(ascent)
    return ascent_grads, kept, {"sam/grad_norm": norm}


def sam(rho: float = DEFAULT_SAM_RHO) -> Regularizer:
    """Sharpness-aware minimisation with neighbourhood radius ``rho``."""
    if not rho > 0:
        raise ValueError(f"SAM's rho must be > 0, got {rho}")

    def gradient(gradient_at, model_params):
        return sam_gradient(gradient_at, model_params, rho=rho)

    return Regularizer(gradient=gradient)


def pta(num_decoders: int | None = None) -> Regularizer:
    """Pseudo-task augmentation with ``num_decoders`` decoders per task
    (``dgr_jax.pta``; default ``pta.DEFAULT_DECODERS``)."""
    from dgr_jax import pta as pta_lib

    num = pta_lib.DEFAULT_DECODERS if num_decoders is None else num_decoders
    if num < 1:
        raise ValueError(f"PTA needs at least one decoder per task, got {num}")
    return Regularizer(heads=lambda heads: pta_lib.DecoderHeads(heads, num))


NONE = Regularizer()
