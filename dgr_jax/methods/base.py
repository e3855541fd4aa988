"""The interface every multi-task method fills in, and the per-task gradients it may need.

A method is an :class:`MTLMethod`, a NamedTuple of pure functions in the spirit of an
optax transform. Loss-weighting methods (equal, DWA, uncertainty, ...) and gradient
methods (PCGrad, CAGrad, ...) fill in the same fields, so the train step never asks
which method it runs:

``init(num_tasks, dtype=float32) -> (params, state)``
    ``params``: learnable method parameters (uncertainty's log-variances; ``()`` for
    most methods). They live in ``TrainState.params["method"]`` and are trained by the
    model's optimizer. ``state``: everything else (DWA's loss history, a PRNG key for a
    randomised method, a solver's warm start), a typed NamedTuple of arrays.
``loss(params, task_losses, state) -> (total, weights)``
    The scalar the step differentiates, before DGR, from the per-task losses ``(T,)``.
    ``weights`` ``(T,)`` are the effective task weights ``d total / d task_losses``:
    logged as metrics and handed to ``combine``.
``combine(task_grads, task_losses, weights, state) -> (grads, state)``
    From the per-task gradients of the *shared* parameters, stacked on a leading task
    axis ``(T, ...)``, to one gradient. Default :func:`weighted_sum`, ``sum_t w_t g_t``,
    which is what differentiating ``total`` gives; gradient methods override it.
``update(state, task_losses, num_examples) -> state``
    Once per step, with the step's (detached) task losses and the number of examples in
    its batch (a short last batch counts for less). Default: unchanged.
``end_epoch(state) -> state``
    Once per epoch, outside or inside jit (pure). Default: unchanged.
``needs_task_grads``
    False: the step differentiates ``total + lambda * P`` once (the cheap path; by
    linearity it equals ``weighted_sum`` of the task gradients plus the DGR gradient).
    True: the step takes the per-task gradients of the shared parameters with
    :func:`per_task_gradients`, calls ``combine`` and only then adds DGR's gradient
    ``lambda * grad P``, as the original code does; task heads and method parameters
    still get ``grad total``.
``level``
    ``"parameters"``: ``combine`` gets the per-task gradients of the shared parameters.
    ``"representation"``: of the shared representation (the encoder's output) instead;
    the step pulls the combined gradient, plus DGR's, back through the encoder once.
``head_weights(state, weights) -> weights``
    The weight of each task's gradient in its own head, from the state ``combine``
    returned. Default: ``weights``.
``metrics(state) -> dict``
    Scalars the step logs as ``method/<name>`` (a solver's residual). Default: none.
``decay_params``
    Whether ``params`` get the model's weight decay (the original code puts uncertainty's
    log-variances in the same SGD parameter group as the network's weights).
``lookahead(state, context: LookAhead) -> state``
    Optional (None: no look-ahead). Before ``loss``, from a virtual step of the model on
    the per-task gradients and the losses of a held-out batch (Auto-lambda). The step then
    needs ``needs_task_grads`` and a held-out batch, under the keys ``heldout/<name>``.
``after_update(state, task_losses, task_losses_after) -> state``
    Optional (None: none). After the optimizer's update, with the task losses of the same
    batch under the updated parameters (FAMO's loss-decrease rates); costs a forward.
``max_shared_norm``
    > 0: the combined shared gradient is clipped to this norm before DGR's is added
    (FAMO's original clips the shared parameters' gradient to 1). Default 0: no clipping.
``shared_state``
    True: ``init(num_tasks, dtype, shared=tree)`` gets the shared parameters (the
    encoder's), for a state shaped like them (DB-MTL's gradient buffers).

``dgr_jax.train.make_train_step`` is the one train step built on this contract.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class NoState(NamedTuple):
    """The state (or params) of a method that keeps none."""


def weighted_sum(
    task_grads: PyTree, task_losses: jax.Array, weights: jax.Array, state: PyTree
) -> tuple[PyTree, PyTree]:
    """``sum_t w_t g_t`` over the leading task axis of every leaf; state unchanged."""
    del task_losses
    weights = jax.lax.stop_gradient(weights)

    def combine_leaf(g):
        if g.shape[:1] != weights.shape:
            raise ValueError(
                f"weighted_sum: task gradients have leading axis {g.shape[:1]}, "
                f"weights have shape {weights.shape}"
            )
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)

    return jax.tree_util.tree_map(combine_leaf, task_grads), state


def unchanged_after_step(
    state: PyTree, task_losses: jax.Array, num_examples: int | jax.Array = 1
) -> PyTree:
    del task_losses, num_examples
    return state


def unchanged(state: PyTree) -> PyTree:
    return state


def same_weights(state: PyTree, weights: jax.Array) -> jax.Array:
    del state
    return weights


def no_metrics(state: PyTree) -> dict:
    del state
    return {}


class MTLMethod(NamedTuple):
    """A multi-task method; see the module docstring for each field's contract."""

    init: Callable[..., tuple[PyTree, PyTree]]
    loss: Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, jax.Array]]
    combine: Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[PyTree, PyTree]] = weighted_sum
    update: Callable[..., PyTree] = unchanged_after_step
    end_epoch: Callable[[PyTree], PyTree] = unchanged
    needs_task_grads: bool = False
    decay_params: bool = False
    level: str = "parameters"
    head_weights: Callable[[PyTree, jax.Array], jax.Array] = same_weights
    metrics: Callable[[PyTree], dict] = no_metrics
    lookahead: Callable[[PyTree, "LookAhead"], PyTree] | None = None
    after_update: Callable[[PyTree, jax.Array, jax.Array], PyTree] | None = None
    max_shared_norm: float = 0.0
    shared_state: bool = False


class LookAhead(NamedTuple):
    """What the step hands ``MTLMethod.lookahead``; every function is pure and
    differentiable. Model parameters are ``{"encoder", "heads"}`` pytrees."""

    params: PyTree  # the model parameters before the step
    task_grads: PyTree  # d l_t / d params on the training batch, leading task axis (T, ...)
    virtual_step: Callable[[PyTree], PyTree]  # model grads -> the params the optimizer would give
    task_losses: Callable[[PyTree], jax.Array]  # params -> (T,) on the training batch
    heldout_losses: Callable[[PyTree], jax.Array]  # params -> (T,) on the held-out batch
    # weights (T,) -> sum_t w_t task_grads[t], differentiable in the weights, without the
    # zero rows of task_grads' heads (each head has one task's gradient); None: from task_grads
    weighted_grads: Callable[[jax.Array], PyTree] | None = None


def clip_by_norm(tree: PyTree, max_norm: float) -> PyTree:
    """``tree`` scaled to norm ``max_norm`` when longer, as torch's ``clip_grad_norm_``
    (its 1e-6); unchanged for ``max_norm == 0``."""
    if not max_norm:
        return tree
    scale = clip_scale(optax.tree.norm(tree), max_norm)
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), tree)


def clip_scale(norm: jax.Array, max_norm: float) -> jax.Array:
    """The factor torch's ``clip_grad_norm_`` scales a gradient of norm ``norm`` by:
    ``min(1, max_norm / (norm + 1e-6))``."""
    return jnp.minimum(1.0, max_norm / (norm + 1e-6))


def state_weights_loss(name: str):
    """``loss`` for a method whose task weights live in ``state.weights`` (updated by the
    method itself, not differentiated): ``sum_t w_t l_t``."""

    def loss(params, task_losses, state):
        del params
        check_losses(name, task_losses, state.weights.shape[0])
        weights = jax.lax.stop_gradient(state.weights).astype(task_losses.dtype)
        return jnp.sum(weights * task_losses), weights

    return loss


def check_argument(name: str, argument: str, value, valid: bool, requirement: str) -> None:
    """One line naming the method, its argument, what it must be and what it got."""
    if not valid:
        raise ValueError(f"{name}: {argument} must be {requirement}, got {value!r}")


def check_num_tasks(name: str, num_tasks: int) -> None:
    if num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be >= 1, got {num_tasks}")


def check_losses(name: str, task_losses: jax.Array, num_tasks: int | None = None) -> None:
    if task_losses.ndim != 1 or (num_tasks is not None and task_losses.shape[0] != num_tasks):
        expected = "(T,)" if num_tasks is None else f"({num_tasks},)"
        raise ValueError(f"{name}: task_losses must have shape {expected}, got {task_losses.shape}")


def per_task_gradients(
    objective: Callable, params: PyTree, num_tasks: int, with_extra: bool = True
):
    """Per-task gradients of ``objective`` on one forward pass.

    ``objective(params) -> ((task_losses (T,), extra scalar), aux)``; ``extra`` is a term
    that is not a task's (the weighted DGR penalty). Returns ``(task_losses, extra,
    task_grads, extra_grads, aux)``: ``task_grads`` holds ``d task_losses[t] / d params``
    stacked on a leading axis of size T, ``extra_grads`` is ``d extra / d params``;
    ``with_extra=False`` (``extra`` known to be 0: DGR off) skips its VJP and returns
    zeros, one backward pass of T + 1 saved.

    One forward, T + 1 VJPs of it (:func:`stacked_vjps`). The train step does better for
    its networks: it runs the heads' backward once and only the encoder's T times.
    """
    (task_losses, extra), vjp, aux = jax.vjp(objective, params, has_aux=True)
    if task_losses.shape != (num_tasks,):
        raise ValueError(
            f"per_task_gradients: the objective returned task losses of shape "
            f"{task_losses.shape}, expected ({num_tasks},)"
        )
    eye = jnp.eye(num_tasks, dtype=task_losses.dtype)
    zero = jnp.zeros_like(extra)
    task_grads = stacked_vjps(vjp, [(eye[t], zero) for t in range(num_tasks)])
    if with_extra:
        (extra_grads,) = vjp((jnp.zeros_like(task_losses), jnp.ones_like(extra)))
    else:
        extra_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    return task_losses, extra, task_grads, extra_grads, aux


def stacked_vjps(vjp: Callable, cotangents: Sequence[PyTree]) -> PyTree:
    """``vjp`` of each cotangent, one after another, stacked on a leading axis.

    ``vjp`` is a function ``jax.vjp`` returned for one primal. A loop rather than ``jax.vmap`` over the cotangents:
    on jax 0.10.2, XLA:CPU miscompiles ``jit(vmap(vjp))`` when a task's output is
    normalised with ``rsqrt`` (the normals; that row's relative error is ~9, though eager
    execution and the loop agree; the 20-line plain-jax case is
    ``tests/test_methods.py::test_jitted_vmapped_vjp_equals_the_eager_rows``, a strict
    xfail that tells us when a JAX release fixes it), and on CPU the loop is also faster
    (three VJPs of the Split ResNet-50 encoder: 1.46 s looped, 2.02 s vmapped).
    """
    rows = [vjp(c)[0] for c in cotangents]
    return jax.tree_util.tree_map(lambda *g: jnp.stack(g), *rows)
