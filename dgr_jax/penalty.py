"""The Dummy Gradient norm Regularization (DGR) penalty and its three gradients.

For dummy head parameters ``phi`` and a scalar loss ``L(phi, *args)`` write
``g = grad_phi L`` and ``u = g / ||g||``. The penalty is ``||g||`` (Frobenius norm
over every leaf of ``phi``), or ``||g||**2`` with ``squared=True``. Its gradient
with respect to any input ``x`` (shared features, encoder parameters, ...) is the
mixed Hessian-vector product ``(dg/dx)^T u``. The three estimators
(``PENALTY_ESTIMATORS``) give the same value and differ only in how that gradient is
formed:

``exact``
    ``P = jvp_phi L(phi, *args)[stop_gradient(u)] = <g, u> = ||g||``. Reverse mode of
    this forward-mode product is exactly ``(dg/dx)^T u`` and keeps the tensor shapes
    of an ordinary backward pass (no transposed-of-transposed convolutions).
``double_backprop``
    ``||jax.grad(L)(phi, *args)||`` differentiated again by reverse mode: the literal
    formula, kept as the reference.
``finite_difference``
    The paper's estimator: the gradient is
    ``(grad_x L(phi + eps*u, *args) - grad_x L(phi, *args)) / eps``. It is the gradient
    of ``S = (L(phi + eps*u) - L(phi)) / eps`` with ``u`` held fixed, so the penalty is
    returned as ``||g|| + S - stop_gradient(S)``: value ``||g||``, gradient that of S.

Gradient with respect to ``dummy_params``: for ``exact`` and ``double_backprop`` it is
the exact ``H_phiphi u``; for ``finite_difference`` its finite-difference estimate.
Training never applies it: dummy sets are fixed for the whole run.

The norm is "safe": where ``g == 0`` the value is 0 and every gradient is 0, not NaN.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[..., jax.Array]

PENALTY_ESTIMATORS = ("exact", "double_backprop", "finite_difference")


def _tree_squared_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("dgr_penalty: dummy_params has no array leaves")
    return sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)


def _safe_sqrt(squared_norm: jax.Array) -> jax.Array:
    # The double `where` keeps the derivative of sqrt at 0 (infinite) out of the
    # backward pass, so a zero gradient gives a zero penalty gradient, not NaN.
    positive = squared_norm > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared_norm, 1.0)), 0.0)


def _stop_gradient_floats(tree: PyTree) -> PyTree:
    """stop_gradient on floating-point leaves; keys, integers and the like pass through."""

    def stop(leaf):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jax.lax.stop_gradient(leaf)
        return leaf

    return jax.tree_util.tree_map(stop, tree)


def _norm_and_direction(loss_fn: LossFn, dummy_params: PyTree, args: tuple):
    """||g|| and u = g/||g|| (u = 0 where g = 0), both constants for autodiff.

    Stopping the gradient on the *inputs* (rather than on g) means the inner
    backward pass is never itself differentiated: it runs once, as plain numbers.
    """
    dummy_params, args = _stop_gradient_floats((dummy_params, args))
    grads = jax.grad(loss_fn)(dummy_params, *args)
    norm = _safe_sqrt(_tree_squared_norm(grads))
    inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    direction = jax.tree_util.tree_map(lambda leaf: leaf * inverse.astype(leaf.dtype), grads)
    return norm, direction


def _exact_norm(loss_fn, dummy_params, args, fd_eps):
    del fd_eps
    _, direction = _norm_and_direction(loss_fn, dummy_params, args)
    _, directional_derivative = jax.jvp(
        lambda params: loss_fn(params, *args), (dummy_params,), (direction,)
    )
    return directional_derivative


def _double_backprop_norm(loss_fn, dummy_params, args, fd_eps):
    del fd_eps
    return _safe_sqrt(_tree_squared_norm(jax.grad(loss_fn)(dummy_params, *args)))


def _finite_difference_norm(loss_fn, dummy_params, args, fd_eps):
    norm, direction = _norm_and_direction(loss_fn, dummy_params, args)
    shifted = jax.tree_util.tree_map(
        lambda param, step: param + fd_eps * step, dummy_params, direction
    )
    difference_quotient = (loss_fn(shifted, *args) - loss_fn(dummy_params, *args)) / fd_eps
    return norm + (difference_quotient - jax.lax.stop_gradient(difference_quotient))


_NORM_FNS = {
    "exact": _exact_norm,
    "double_backprop": _double_backprop_norm,
    "finite_difference": _finite_difference_norm,
}


def _single_penalty(loss_fn, dummy_params, args, estimator, squared, fd_eps):
    if estimator == "double_backprop" and squared:
        # The literal reference for the squared objective: sum of squares, no sqrt.
        return _tree_squared_norm(jax.grad(loss_fn)(dummy_params, *args))
    norm = _NORM_FNS[estimator](loss_fn, dummy_params, args, fd_eps)
    # d(n^2) = 2 n dn, with dn the method's gradient of ||g||: 2 (dg/dx)^T g for exact.
    return jnp.square(norm) if squared else norm


def _num_stacked_sets(dummy_params: PyTree) -> int:
    leaves, _ = jax.tree_util.tree_flatten_with_path(dummy_params)
    if not leaves:
        raise ValueError("dgr_penalty: dummy_params has no array leaves")
    sizes = {}
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"dgr_penalty(stacked=True): leaf {jax.tree_util.keystr(path)} is a scalar; "
                "every leaf needs a leading axis K (one entry per dummy set)"
            )
        sizes.setdefault(jnp.shape(leaf)[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        found = ", ".join(f"{k} at {path}" for k, path in sizes.items())
        raise ValueError(
            f"dgr_penalty(stacked=True): leaves disagree on the leading (dummy set) axis: {found}"
        )
    return next(iter(sizes))


def dgr_penalty(
    loss_fn: LossFn,
    dummy_params: PyTree,
    *args: Any,
    estimator: str = "exact",
    squared: bool = False,
    fd_eps: float = 1e-3,
    stacked: bool = False,
    unroll_sets: bool = False,
    method: str | None = None,
) -> jax.Array:
    """The DGR penalty ``||grad_{dummy_params} loss_fn(dummy_params, *args)||``.

    Args:
      loss_fn: ``loss_fn(dummy_params, *args) -> scalar``; typically the summed task
        losses of dummy heads applied to shared features.
      dummy_params: pytree of the dummy head parameters. With ``stacked=True`` every
        leaf has a leading axis K, one entry per dummy set (e.g. from
        ``jax.vmap(init)``).
      *args: the rest of ``loss_fn``'s inputs (features, targets, ...). Gradients flow
        to every floating-point leaf of them.
      estimator: ``"exact"`` (forward-over-reverse, default), ``"double_backprop"``
        (reverse-over-reverse reference) or ``"finite_difference"`` (the paper's
        estimator, an ablation). All three return the same value.
      squared: penalise ``||g||**2`` (the objective of the original code) instead of
        ``||g||``; value and gradient are both those of the square.
      fd_eps: step along ``g/||g||`` for ``estimator="finite_difference"``: a positive
        number, or a traced scalar (an argument of a jitted function, so that one
        compiled program serves every step; a traced step is not checked).
      stacked: ``dummy_params`` holds K dummy sets on a leading axis; the result is
        the mean of the K penalties, computed with ``jax.vmap``.
      unroll_sets: with ``stacked``, compute the K penalties one after another in the
        same program instead of vmapped. Same value and gradient; vmap turns the
        heads' convolutions into grouped convolutions, which XLA:CPU runs slower than
        K separate ones (GPUs and TPUs favour vmap).
      method: the former name of ``estimator``, still accepted.

    Returns:
      A scalar. Pure: works under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
    """
    if method is not None:
        if estimator not in ("exact", method):
            raise ValueError(
                f"dgr_penalty: estimator={estimator!r} and method={method!r} disagree; "
                "pass estimator only"
            )
        estimator = method
    if estimator not in _NORM_FNS:
        raise ValueError(
            f"dgr_penalty: unknown estimator {estimator!r}; choose one of {PENALTY_ESTIMATORS}"
        )
    if estimator == "finite_difference":
        try:
            concrete = float(fd_eps)
        except TypeError:  # traced (ConcretizationTypeError is a TypeError): not checked
            concrete = None
        if concrete is not None and not concrete > 0:
            raise ValueError(f"dgr_penalty: fd_eps must be positive, got {fd_eps!r}")

    def single(params, *call_args):
        return _single_penalty(loss_fn, params, call_args, estimator, squared, fd_eps)

    if not stacked:
        return single(dummy_params, *args)
    num_sets = _num_stacked_sets(dummy_params)
    if unroll_sets:
        per_set = [
            single(jax.tree_util.tree_map(lambda leaf, k=k: leaf[k], dummy_params), *args)
            for k in range(num_sets)
        ]
        return sum(per_set) / num_sets
    per_set = jax.vmap(single, in_axes=(0,) + (None,) * len(args))(dummy_params, *args)
    return jnp.mean(per_set)


def init_dummy_sets(
    module: Any, key: jax.Array, num_sets: int, *init_args: Any, **init_kwargs: Any
) -> PyTree:
    """K independently initialised copies of a Flax module's ``params``, stacked.

    Each set is ``module.init(key_k, *init_args, **init_kwargs)["params"]`` with its own
    key from ``jax.random.split(key, num_sets)``, so the dummy sets share the task
    heads' architecture and initialiser but not their values. Only ``params`` is kept:
    inside the penalty BatchNorm runs on batch statistics, so running statistics of
    dummy sets are never used.
    """
    if num_sets < 1:
        raise ValueError(f"init_dummy_sets: num_sets must be >= 1, got {num_sets}")
    keys = jax.random.split(key, num_sets)
    return jax.vmap(lambda k: module.init(k, *init_args, **init_kwargs)["params"])(keys)


def multitask_dummy_loss(
    apply_heads: Callable[[PyTree, PyTree], Mapping[str, jax.Array]],
    task_losses: Mapping[str, Callable[[jax.Array, Any], jax.Array]],
) -> LossFn:
    """``L_d(phi, features, targets) = sum_t loss_t(apply_heads(phi, features)[t], targets[t])``.

    ``apply_heads(params, features)`` maps one dummy set and the shared features to a
    dict of per-task outputs; ``task_losses[t](output, target)`` gives a scalar. The
    dummy loss is unweighted: every task's dummy head counts equally.
    """

    def loss_fn(dummy_params, features, targets):
        outputs = apply_heads(dummy_params, features)
        missing = sorted(set(task_losses) - set(outputs))
        if missing:
            raise KeyError(f"multitask_dummy_loss: apply_heads gave no output for tasks {missing}")
        return sum(task_losses[task](outputs[task], targets[task]) for task in task_losses)

    return loss_fn


def heads_penalty(
    apply_heads: Callable[[PyTree, PyTree], Mapping[str, jax.Array]],
    dummy_sets: PyTree,
    features: PyTree,
    targets: Mapping[str, Any],
    task_losses: Mapping[str, Callable[[jax.Array, Any], jax.Array]],
    *,
    estimator: str = "exact",
    squared: bool = False,
    fd_eps: float = 1e-3,
    unroll_sets: bool = False,
) -> jax.Array:
    """Mean DGR penalty of K stacked dummy head sets on already computed features.

    The caller runs the encoder once, ``z = encoder(x)``, and differentiates
    ``main_loss(z) + weight * heads_penalty(..., z, ...)``: the penalty depends on the
    encoder only through ``z``, so one backward pass through the encoder carries both
    gradients (docs/design.md, "Share the encoder backward"). ``features`` may be any
    pytree (MTAN: one entry per task); ``apply_heads`` decides which head reads what.
    """
    return dgr_penalty(
        multitask_dummy_loss(apply_heads, task_losses),
        dummy_sets,
        features,
        targets,
        estimator=estimator,
        squared=squared,
        fd_eps=fd_eps,
        stacked=True,
        unroll_sets=unroll_sets,
    )
