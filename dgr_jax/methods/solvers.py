"""Small solvers for the gradient methods, on device, in fixed iteration counts.

Every gradient method here reduces to a problem on the T x T Gram matrix of the task
gradients (T is the number of tasks, a handful), so the solvers are cheap next to one
backward pass and run inside the jitted step: no scipy, cvxpy or host round trip. Each
returns a residual that is 0 at the exact solution, logged by the step, so a solver that
has not converged says so.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def project_to_simplex(v: jax.Array) -> jax.Array:
    """The Euclidean projection of ``v`` (T,) onto ``{w >= 0, sum w = 1}`` (sort-based:
    Held, Wolfe and Crowder 1974)."""
    sorted_v = jnp.sort(v)[::-1]
    cumulative = jnp.cumsum(sorted_v) - 1.0
    index = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    active = sorted_v - cumulative / index > 0
    rho = jnp.max(jnp.where(active, jnp.arange(v.shape[0]), 0))
    theta = cumulative[rho] / (rho + 1).astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _candidate_steps(dtype) -> jax.Array:
    return 2.0 ** jnp.arange(4, -30, -1).astype(dtype)


def projected_descent(
    objective: Callable[[jax.Array], jax.Array],
    project: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    iterations: int,
) -> jax.Array:
    """Minimise a convex ``objective`` over a convex set by projected gradient steps.

    Each iteration tries a ladder of step sizes (16 down to 2^-29, relative to the
    problem's scale, which the callers normalise to ~1) from the current point and keeps
    the best projected point if it improves, with a momentum extrapolation tried as one
    more candidate: monotone, scale-free and branch-free, so it runs in a fixed number of
    iterations under jit. Problems here have T <= ~10 variables, so the ladder is cheap.
    """
    steps = _candidate_steps(x0.dtype)
    grad = jax.grad(objective)

    def body(_, carry):
        x, previous = carry
        g = grad(x)
        candidates = jax.vmap(lambda s: project(x - s * g))(steps)
        momentum = project(x + 0.9 * (x - previous))
        candidates = jnp.concatenate([candidates, momentum[None], x[None]])
        values = jax.vmap(objective)(candidates)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        best = candidates[jnp.argmin(values)]
        return best, x

    x, _ = jax.lax.fori_loop(0, iterations, body, (x0, x0))
    return x


def frank_wolfe_gap(gradient: jax.Array, w: jax.Array) -> jax.Array:
    """``<gradient, w> - min_i gradient_i``: the duality gap of a convex problem on the
    simplex at ``w``, >= 0 and 0 exactly at a minimiser."""
    return jnp.dot(gradient, w) - jnp.min(gradient)


def min_norm_in_hull(gram: jax.Array, iterations: int = 300) -> tuple[jax.Array, jax.Array]:
    """``w = argmin_{w in simplex} w^T gram w``: the weights of the minimum-norm point of
    the convex hull of the task gradients (MGDA, Sener and Koltun 2018). Returns ``(w,
    residual)``, the residual the Frank-Wolfe gap relative to ``max diag(gram)``."""
    num_tasks = gram.shape[0]
    scale = jnp.maximum(jnp.max(jnp.diag(gram)), jnp.finfo(gram.dtype).tiny)
    normalised = gram / scale
    w = projected_descent(
        lambda w: w @ normalised @ w,
        project_to_simplex,
        jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype),
        iterations,
    )
    return w, frank_wolfe_gap(2.0 * normalised @ w, w)


def nonnegative_quadratic(
    gram: jax.Array, linear: jax.Array, iterations: int = 300
) -> tuple[jax.Array, jax.Array]:
    """``v = argmin_{v >= 0} 1/2 v^T gram v + linear^T v``. Returns ``(v, residual)``, the
    residual the largest violation of the KKT conditions (``grad >= 0``, ``v * grad = 0``)
    relative to ``max diag(gram)``.

    Up to 10 variables the solution is exact: every active set's equality-constrained
    minimiser is solved at once (2^T small systems) and the best feasible one kept.
    Beyond, projected descent for ``iterations`` steps."""
    size = gram.shape[0]
    scale = jnp.maximum(jnp.max(jnp.diag(gram)), jnp.finfo(gram.dtype).tiny)
    a, b = gram / scale, linear / scale

    def objective(v):
        return 0.5 * v @ a @ v + b @ v

    if size <= 10:
        masks = (jnp.arange(2**size)[:, None] >> jnp.arange(size)[None, :]) & 1
        masks = masks.astype(bool)

        def restricted(free):
            system = jnp.where(free[:, None] & free[None, :], a, 0.0) + jnp.diag(~free)
            return jnp.where(free, jnp.linalg.solve(system, jnp.where(free, -b, 0.0)), 0.0)

        candidates = jax.vmap(restricted)(masks)
        values = jax.vmap(objective)(candidates)
        feasible = jnp.all(candidates >= 0, axis=1) & jnp.isfinite(values)
        v = candidates[jnp.argmin(jnp.where(feasible, values, jnp.inf))]
    else:
        v = projected_descent(
            objective, lambda v: jnp.maximum(v, 0.0), jnp.zeros_like(linear), iterations
        )
    g = a @ v + b
    residual = jnp.maximum(jnp.max(jnp.maximum(-g, 0.0)), jnp.max(jnp.abs(v * g)))
    return v, residual


def bargaining_weights(
    gram: jax.Array, start: jax.Array, iterations: int = 20
) -> tuple[jax.Array, jax.Array]:
    """Nash-MTL's ``alpha > 0`` with ``gram @ alpha = 1 / alpha`` (Navon et al. 2022,
    the bargaining solution), by damped Newton steps from ``start``.

    It is the minimiser of the strictly convex ``1/2 a^T gram a - sum log a`` (whose
    gradient is the bargaining equation), so Newton converges quadratically; each step
    is shortened to stay positive and not to increase the objective. Returns ``(alpha,
    residual)``, the residual ``||gram alpha - 1/alpha|| / ||1/alpha||``.
    """

    def objective(a):
        return 0.5 * a @ gram @ a - jnp.sum(jnp.log(a))

    fractions = 2.0 ** -jnp.arange(0, 30).astype(gram.dtype)

    def body(_, a):
        g = gram @ a - 1.0 / a
        hessian = gram + jnp.diag(1.0 / jnp.square(a))
        direction = -jnp.linalg.solve(hessian, g)
        candidates = a[None] + fractions[:, None] * direction[None]
        candidates = jnp.concatenate([candidates, a[None]])
        values = jax.vmap(objective)(candidates)
        values = jnp.where(jnp.all(candidates > 0, axis=1) & jnp.isfinite(values), values, jnp.inf)
        return candidates[jnp.argmin(values)]

    alpha = jax.lax.fori_loop(0, iterations, body, start)
    residual = jnp.linalg.norm(gram @ alpha - 1.0 / alpha) / jnp.linalg.norm(1.0 / alpha)
    return alpha, residual
