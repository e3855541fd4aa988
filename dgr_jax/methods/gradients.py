"""Gradient methods: the per-task gradients of the shared part, combined into one.

Every method here combines the gradients ``g_t`` of the weighted task losses ``w_t l_t``
(``w`` from ``loss``; 1 but for IMTL's loss scales), as the original code backpropagates
each weighted loss, and returns ``sum_t c_t g_t`` for coefficients ``c`` that depend on
the gradients only through their T x T Gram matrix ``G_ij = <g_i, g_j>``. So no method
flattens the model's gradients: the Gram matrix is a sum over leaves, the solvers
(``solvers``) work on T x T matrices inside the step, and the combination is one weighted
sum per leaf. GradDrop, which acts element-wise, is the exception; it runs on the shared
representation (``level="representation"``), as its paper proposes.

Scale: as in auto-lambda's ``overwrite_grad``, a method's result is scaled so that T
identical task gradients give their sum, equal weighting's gradient (PCGrad, CAGrad,
MGDA, UPGrad, GradVac, GradDrop); IMTL, Nash-MTL and Aligned-MTL keep their papers'
scales (the originals'), said in each docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dgr_jax.methods import solvers
from dgr_jax.methods.base import (
    MTLMethod,
    NoState,
    check_argument,
    check_losses,
    check_num_tasks,
    clip_scale,
)


def gram_matrix(task_grads) -> jax.Array:
    """``G_ij = <g_i, g_j>`` over every leaf of a pytree with a leading task axis."""
    leaves = jax.tree_util.tree_leaves(task_grads)
    rows = [g.reshape(g.shape[0], -1) for g in leaves]
    return sum(r @ r.T for r in rows)


def task_norms(task_grads) -> jax.Array:
    """``||g_t||`` over every leaf, for each task: the Gram matrix's diagonal, without the
    off-diagonal products."""
    leaves = jax.tree_util.tree_leaves(task_grads)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves))


def combine_with(coefficients: jax.Array, task_grads):
    """``sum_t c_t g_t`` on every leaf."""
    coefficients = jax.lax.stop_gradient(coefficients)
    return jax.tree_util.tree_map(
        lambda g: jnp.tensordot(coefficients.astype(g.dtype), g, axes=1), task_grads
    )


class KeyState(NamedTuple):
    key: jax.Array  # advanced once per step


class ResidualState(NamedTuple):
    residual: jax.Array  # (): the solver's residual in the last step (0 when exact)


def _sum_loss(name):
    def loss(params, task_losses, state):
        del params, state
        check_losses(name, task_losses)
        return jnp.sum(task_losses), jnp.ones_like(task_losses)

    return loss


def _gram_method(
    name, coefficients, init_state, loss=None, init_params=None, **fields
) -> MTLMethod:
    """A method whose ``combine`` is ``sum_t c_t w_t g_t`` with ``(c, state) =
    coefficients(G, task_losses, state)``, ``G`` the Gram matrix of ``w_t g_t``."""

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks(name, num_tasks)
        params = NoState() if init_params is None else init_params(num_tasks, dtype)
        return params, init_state(num_tasks, dtype)

    def combine(task_grads, task_losses, weights, state):
        weights = jax.lax.stop_gradient(weights)
        gram = gram_matrix(task_grads) * jnp.outer(weights, weights).astype(
            jax.tree_util.tree_leaves(task_grads)[0].dtype
        )
        c, state = coefficients(gram, task_losses, state)
        return combine_with(c * weights.astype(c.dtype), task_grads), state

    return MTLMethod(
        init=init,
        loss=loss or _sum_loss(name),
        combine=combine,
        needs_task_grads=True,
        metrics=_residual_metrics,
        **fields,
    )


def _residual_metrics(state):
    return {"residual": state.residual} if hasattr(state, "residual") else {}


def _other_tasks(key, num_tasks):
    """(T, T-1): for each task, the other tasks in a random order (one key per task)."""
    keys = jax.random.split(key, num_tasks)
    index = jnp.arange(num_tasks)

    def others(k, i):
        # The other tasks, as the original builds them: i replaced by the last index.
        return jax.random.permutation(k, jnp.where(index == i, num_tasks - 1, index)[:-1])

    return jax.vmap(others)(keys, index)


# ----------------------------------------------------------------------------- PCGrad


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020) on the
    Gram matrix: task i's gradient is projected, in the order ``orders[i]`` (T-1 other
    tasks), onto the normal plane of every task gradient it conflicts with; the result is
    the sum of the projected gradients. Returns ``c`` with ``result = sum_j c_j g_j``."""
    num_tasks = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)) + 1e-8  # the original's epsilon
    rows = jnp.eye(num_tasks, dtype=gram.dtype)  # g'_i = rows[i] @ g
    for r in range(num_tasks - 1):
        j = orders[:, r]
        dots = jnp.einsum("ik,ik->i", rows, gram[:, j].T) / norms[j]
        rows = rows - (jnp.minimum(dots, 0.0) / norms[j])[:, None] * jax.nn.one_hot(
            j, num_tasks, dtype=gram.dtype
        )
    return jnp.sum(rows, axis=0)


def pcgrad() -> MTLMethod:
    """PCGrad with the projection order drawn each step from the state's PRNG key (as
    the original shuffles the other tasks per task), summed over tasks."""

    def init_state(num_tasks, dtype):
        del dtype
        return KeyState(key=jax.random.PRNGKey(num_tasks))

    def coefficients(gram, task_losses, state):
        key, sub = jax.random.split(state.key)
        return pcgrad_coefficients(gram, _other_tasks(sub, gram.shape[0])), KeyState(key)

    return _gram_method("pcgrad", coefficients, init_state)


# ----------------------------------------------------------------------------- CAGrad


def cagrad_coefficients(gram, c, rescale=1, iterations=300):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent", NeurIPS 2021):
    ``w = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||`` with ``g_0`` the average
    gradient and ``g_w = sum w_t g_t``; the update ``g_0 + (c ||g_0|| / ||g_w||) g_w``,
    divided by ``1 + c^2`` (``rescale=1``, the original's default), ``1 + c``
    (``rescale=2``) or not (``0``), times T. Returns ``(coefficients, residual)``."""
    num_tasks = gram.shape[0]
    scale = jnp.maximum(jnp.max(jnp.diag(gram)), jnp.finfo(gram.dtype).tiny)
    a = gram / scale
    mean = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
    radius = c * jnp.sqrt(jnp.mean(a) + 1e-8) + 1e-8  # c ||g_0||, as the original

    def objective(w):
        return w @ a @ mean + radius * jnp.sqrt(w @ a @ w + 1e-8)

    w = solvers.projected_descent(objective, solvers.project_to_simplex, mean, iterations)
    residual = solvers.frank_wolfe_gap(jax.grad(objective)(w), w)
    lam = radius / (jnp.sqrt(w @ a @ w) + 1e-8)
    result = mean + lam * w
    divisor = {0: 1.0, 1: 1.0 + c**2}.get(rescale, 1.0 + c)
    return num_tasks * result / divisor, residual


def cagrad(c: float = 0.4, rescale: int = 1, iterations: int = 300) -> MTLMethod:
    """CAGrad; ``c = 0.4`` and ``rescale = 1`` as auto-lambda and the DGR repository run it."""
    check_argument(
        "cagrad", "iterations", iterations, int(iterations) == iterations >= 1, "an integer >= 1"
    )
    if not c >= 0:
        raise ValueError(f"cagrad: c must be >= 0, got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")

    def init_state(num_tasks, dtype):
        return ResidualState(residual=jnp.zeros((), dtype))

    def coefficients(gram, task_losses, state):
        coeffs, residual = cagrad_coefficients(gram, c, rescale, iterations)
        return coeffs, ResidualState(residual.astype(state.residual.dtype))

    return _gram_method("cagrad", coefficients, init_state)


# ----------------------------------------------------------------------------- MGDA


def mgda(iterations: int = 300, level: str = "representation") -> MTLMethod:
    """MGDA (Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018): the minimum-norm point of the convex hull of the task gradients, times
    T. ``level="representation"`` is MGDA-UB (the gradients with respect to the shared
    representation give the weights; the encoder is backpropagated once);
    ``level="parameters"`` uses the shared parameters' gradients."""
    check_argument(
        "mgda", "iterations", iterations, int(iterations) == iterations >= 1, "an integer >= 1"
    )
    if level not in ("representation", "parameters"):
        raise ValueError(f"mgda: level must be 'representation' or 'parameters', got {level!r}")

    def init_state(num_tasks, dtype):
        return ResidualState(residual=jnp.zeros((), dtype))

    def coefficients(gram, task_losses, state):
        w, residual = solvers.min_norm_in_hull(gram, iterations)
        return gram.shape[0] * w, ResidualState(residual.astype(state.residual.dtype))

    return _gram_method("mgda", coefficients, init_state, level=level)


# ----------------------------------------------------------------------------- IMTL


class IMTLParams(NamedTuple):
    loss_scale: jax.Array  # (T,): s_t, the scaled loss is exp(s_t) l_t - s_t


def imtl_coefficients(gram: jax.Array) -> jax.Array:
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): ``alpha``
    summing to 1 such that ``g = sum alpha_t g_t`` has equal projections onto every unit
    task gradient: ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}`` with rows ``D = g_1 - g_t``,
    ``U = u_1 - u_t``, ``alpha_1 = 1 - sum alpha_{2:T}``; from the Gram matrix."""
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), jnp.finfo(gram.dtype).tiny))
    by_unit = gram / norms[None, :]  # <g_i, u_j>
    # g_1 . (u_1 - u_b) and (g_1 - g_a) . (u_1 - u_b), for a, b = 2..T
    g1_u = by_unit[0, 0] - by_unit[0, 1:]
    d_u = g1_u[None, :] - (by_unit[1:, 0:1] - by_unit[1:, 1:])
    # pinv: the inverse when it exists; with parallel task gradients (singular D U^T) the
    # minimum-norm alpha, which gives their common direction instead of NaN.
    alpha = g1_u @ jnp.linalg.pinv(d_u)
    return jnp.concatenate([1.0 - jnp.sum(alpha, keepdims=True), alpha])


def imtl(learn_loss_scale: bool = True) -> MTLMethod:
    """The hybrid IMTL: IMTL-L scales each loss to ``exp(s_t) l_t - s_t`` with a learned
    ``s`` (from 0, trained by the model's optimizer), IMTL-G combines the scaled losses'
    gradients (coefficients summing to 1, the paper's and the original's scale). Heads
    get their scaled loss's gradient. The DGR repository's IMTL never hands ``s`` to an
    optimizer, so it stays 0 there: ``learn_loss_scale=False`` is that."""

    def loss(params, task_losses, state):
        del state
        check_losses("imtl", task_losses, params.loss_scale.shape[0])
        s = params.loss_scale.astype(task_losses.dtype)
        if not learn_loss_scale:
            s = jax.lax.stop_gradient(s)
        scales = jnp.exp(s)
        return jnp.sum(scales * task_losses - s), scales

    def coefficients(gram, task_losses, state):
        alpha = imtl_coefficients(gram)
        norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), jnp.finfo(gram.dtype).tiny))
        projections = (alpha @ gram) / norms
        spread = (jnp.max(projections) - jnp.min(projections)) / jnp.maximum(
            jnp.max(jnp.abs(projections)), jnp.finfo(gram.dtype).tiny
        )
        return alpha, ResidualState(spread.astype(state.residual.dtype))

    return _gram_method(
        "imtl",
        coefficients,
        lambda num_tasks, dtype: ResidualState(jnp.zeros((), dtype)),
        loss=loss,
        init_params=lambda num_tasks, dtype: IMTLParams(jnp.zeros((num_tasks,), dtype)),
    )


# ----------------------------------------------------------------------------- Nash-MTL


class NashState(NamedTuple):
    alpha: jax.Array  # (T,): the last step's bargaining weights, the next one's start
    residual: jax.Array


def nash_mtl(max_norm: float = 1.0, iterations: int = 20) -> MTLMethod:
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022):
    ``alpha > 0`` solving ``G alpha = 1 / alpha`` for the Gram matrix normalised by its
    Frobenius norm (as the original), warm-started from the last step; the shared
    gradient is ``sum alpha_t g_t`` clipped to norm ``max_norm`` (the original clips
    the encoder's gradient to 1), each head gets ``alpha_t`` times its task's gradient
    (the original backpropagates ``sum alpha_t l_t``). The original approximates alpha by
    20 convex-concave steps with ECOS; here damped Newton solves the equation itself."""
    check_argument(
        "nash_mtl", "iterations", iterations, int(iterations) == iterations >= 1, "an integer >= 1"
    )
    if not max_norm >= 0:
        raise ValueError(f"nash_mtl: max_norm must be >= 0 (0: no clipping), got {max_norm}")

    def init_state(num_tasks, dtype):
        return NashState(alpha=jnp.ones((num_tasks,), dtype), residual=jnp.zeros((), dtype))

    def coefficients(gram, task_losses, state):
        normalised = gram / jnp.maximum(jnp.linalg.norm(gram), jnp.finfo(gram.dtype).tiny)
        alpha, residual = solvers.bargaining_weights(
            normalised, state.alpha.astype(gram.dtype), iterations
        )
        c = alpha
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0))
            c = c * clip_scale(norm, max_norm)  # the clip of sum_t c_t g_t, from G
        state = NashState(alpha.astype(state.alpha.dtype), residual.astype(state.residual.dtype))
        return c, state

    def head_weights(state, weights):
        return weights * state.alpha.astype(weights.dtype)

    return _gram_method("nash_mtl", coefficients, init_state, head_weights=head_weights)


# ----------------------------------------------------------------------------- UPGrad


def upgrad_coefficients(gram: jax.Array, iterations: int = 300):
    """UPGrad (Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization",
    2024): each task gradient projected onto the dual cone of all of them,
    ``pi(g_i) = g_i + sum_j lambda_j g_j`` with ``lambda = argmin_{l >= 0} 1/2 l^T G l +
    l^T G e_i``, summed over i (TorchJD averages; times T here). Returns ``(c, residual)``."""
    num_tasks = gram.shape[0]
    eye = jnp.eye(num_tasks, dtype=gram.dtype)
    lambdas, residuals = jax.vmap(
        lambda e: solvers.nonnegative_quadratic(gram, gram @ e, iterations)
    )(eye)
    return jnp.sum(eye + lambdas, axis=0), jnp.max(residuals)


def upgrad(iterations: int = 300) -> MTLMethod:
    """UPGrad, TorchJD's recommended aggregator: the result never conflicts with a task."""
    check_argument(
        "upgrad", "iterations", iterations, int(iterations) == iterations >= 1, "an integer >= 1"
    )

    def init_state(num_tasks, dtype):
        return ResidualState(residual=jnp.zeros((), dtype))

    def coefficients(gram, task_losses, state):
        c, residual = upgrad_coefficients(gram, iterations)
        return c, ResidualState(residual.astype(state.residual.dtype))

    return _gram_method("upgrad", coefficients, init_state)


# ----------------------------------------------------------------------------- Aligned-MTL


def aligned_mtl_coefficients(gram: jax.Array) -> jax.Array:
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023): with ``G = V diag(lambda) V^T`` over the non-negligible
    eigenvalues, ``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T`` makes the task
    gradients orthogonal with equal norms; the result is ``sum_t (B 1)_t g_t`` (the
    paper's scale: orthonormal gradients give their sum)."""
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    size = gram.shape[0]
    tolerance = jnp.max(eigenvalues) * size * jnp.finfo(gram.dtype).eps
    kept = eigenvalues > tolerance
    smallest = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
    inverse_root = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
    b = jnp.sqrt(smallest) * (vectors * inverse_root[None, :]) @ vectors.T
    return jnp.sum(b, axis=0)


def aligned_mtl() -> MTLMethod:
    """Aligned-MTL on the shared parameters' gradients."""

    def init_state(num_tasks, dtype):
        del num_tasks, dtype
        return NoState()

    return _gram_method(
        "aligned_mtl",
        lambda gram, losses, state: (aligned_mtl_coefficients(gram), state),
        init_state,
    )


# ----------------------------------------------------------------------------- GradVac


class GradVacState(NamedTuple):
    targets: jax.Array  # (T, T): the running targets of the pairwise cosine similarity
    key: jax.Array


def gradvac_coefficients(gram, targets, orders, beta):
    """Gradient Vaccine (Wang et al., "Gradient Vaccine", ICLR 2021), on the whole shared
    gradient: task i's gradient, in the order ``orders[i]``, is moved toward each other
    task gradient ``g_j`` whose cosine with it is below the running target
    ``targets[i, j]``, until the cosine equals the target; the targets move by ``beta``
    toward the cosines seen. Returns ``(c, new_targets)`` with ``result = sum_j c_j g_j``
    (the sum of the altered gradients)."""
    num_tasks = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)) + 1e-8
    rows = jnp.eye(num_tasks, dtype=gram.dtype)
    index = jnp.arange(num_tasks)
    for r in range(num_tasks - 1):
        j = orders[:, r]
        row_norms = jnp.sqrt(jnp.maximum(jnp.einsum("ik,kl,il->i", rows, gram, rows), 0.0))
        cosine = jnp.einsum("ik,ik->i", rows, gram[:, j].T) / (row_norms * norms[j] + 1e-8)
        target = targets[index, j]
        size = (
            row_norms
            * (target * jnp.sqrt(1 - cosine**2) - cosine * jnp.sqrt(1 - target**2))
            / (norms[j] * jnp.sqrt(1 - target**2) + 1e-8)
        )
        size = jnp.where(cosine < target, size, 0.0)
        rows = rows + size[:, None] * jax.nn.one_hot(j, num_tasks, dtype=gram.dtype)
        targets = targets.at[index, j].set((1 - beta) * target + beta * cosine)
    return jnp.sum(rows, axis=0), targets


def gradvac(beta: float = 0.01) -> MTLMethod:
    """GradVac with the paper's ``beta = 0.01`` (targets from 0), the order of the other
    tasks drawn each step from the state's key."""
    if not 0 <= beta <= 1:
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")

    def init_state(num_tasks, dtype):
        return GradVacState(
            targets=jnp.zeros((num_tasks, num_tasks), dtype), key=jax.random.PRNGKey(num_tasks)
        )

    def coefficients(gram, task_losses, state):
        key, sub = jax.random.split(state.key)
        c, targets = gradvac_coefficients(
            gram, state.targets.astype(gram.dtype), _other_tasks(sub, gram.shape[0]), beta
        )
        return c, GradVacState(targets.astype(state.targets.dtype), key)

    return _gram_method("gradvac", coefficients, init_state)


# ----------------------------------------------------------------------------- GradDrop


def graddrop_combine(task_grads, uniforms, leak=0.0):
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020), element-wise on every
    leaf: the sign purity ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``; with ``U`` uniform,
    positive components survive where ``P > U`` and negative ones where ``P < U``; the
    survivors are summed over tasks (``leak`` keeps that fraction of the dropped ones).
    ``uniforms``: one array per leaf, of the leaf's shape without the task axis."""

    def leaf(g, u):
        purity = 0.5 * (1.0 + jnp.sum(g, axis=0) / (jnp.sum(jnp.abs(g), axis=0) + 1e-8))
        keep = ((purity > u)[None] & (g > 0)) | ((purity < u)[None] & (g < 0))
        return jnp.sum(g * (leak + (1.0 - leak) * keep.astype(g.dtype)), axis=0)

    return jax.tree_util.tree_map(leaf, task_grads, uniforms)


def graddrop(leak: float = 0.0) -> MTLMethod:
    """GradDrop on the gradients with respect to the shared representation (its paper's
    placement), the uniforms drawn from the state's key each step; the encoder is then
    backpropagated once."""
    if not 0 <= leak <= 1:
        raise ValueError(f"graddrop: leak must be in [0, 1], got {leak}")

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("graddrop", num_tasks)
        return NoState(), KeyState(key=jax.random.PRNGKey(num_tasks))

    def combine(task_grads, task_losses, weights, state):
        del task_losses
        weights = jax.lax.stop_gradient(weights)
        task_grads = jax.tree_util.tree_map(
            lambda g: g * weights.astype(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)), task_grads
        )
        key, sub = jax.random.split(state.key)
        leaves, tree = jax.tree_util.tree_flatten(task_grads)
        keys = jax.random.split(sub, len(leaves))
        uniforms = [jax.random.uniform(k, g.shape[1:], g.dtype) for k, g in zip(keys, leaves)]
        return graddrop_combine(
            task_grads, jax.tree_util.tree_unflatten(tree, uniforms), leak
        ), KeyState(key)

    return MTLMethod(
        init=init,
        loss=_sum_loss("graddrop"),
        combine=combine,
        needs_task_grads=True,
        level="representation",
    )


METHODS = {
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "mgda": mgda,
    "imtl": imtl,
    "nash_mtl": nash_mtl,
    "upgrad": upgrad,
    "aligned_mtl": aligned_mtl,
    "gradvac": gradvac,
    "graddrop": graddrop,
}
