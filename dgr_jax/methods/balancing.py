"""Gradient-magnitude balancing: methods that weigh the tasks by the norms of their
gradients on the shared parameters (GradNorm, DB-MTL).

Both need the per-task gradients of the shared parameters (``needs_task_grads``), but
only through their norms (``gradients.task_norms``) or an average of them
(DB-MTL), so their combination stays a weighted sum per leaf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgr_jax.methods.base import (
    MTLMethod,
    NoState,
    check_argument,
    check_losses,
    check_num_tasks,
    state_weights_loss,
)
from dgr_jax.methods.gradients import combine_with, task_norms


class GradNormState(NamedTuple):
    weights: jax.Array  # (T,): w, summing to T
    opt_state: optax.OptState  # the weights' Adam state
    initial_losses: jax.Array  # (T,): L(0), the first step's losses
    steps: jax.Array  # (): steps taken


def gradnorm_weight_gradient(
    weights: jax.Array, grad_norms: jax.Array, loss_ratios: jax.Array, alpha: float
) -> jax.Array:
    """``d L_grad / d w`` for ``L_grad = sum_i |w_i n_i - mean_j(w_j n_j) r_i^alpha|``,
    the target held constant (the paper's rule): ``n_i = ||grad l_i||`` on the shared
    parameters, ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``."""
    norms = weights * grad_norms
    inverse_rate = loss_ratios / jnp.mean(loss_ratios)
    target = jax.lax.stop_gradient(jnp.mean(norms) * inverse_rate**alpha)
    return jnp.sign(norms - target) * grad_norms


def gradnorm(alpha: float = 1.5, lr: float = 0.025) -> MTLMethod:
    """GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018), ``alpha = 1.5`` (the paper's for
    NYUv2). The step trains on ``sum_t w_t l_t``; then ``w`` takes an Adam step (``lr``)
    on ``d L_grad / d w`` and is renormalised to sum T (kept above 1e-3 T). The gradient
    norms are over every shared parameter (the encoder), as LibMTL's, not the last
    shared layer only."""
    check_argument("gradnorm", "alpha", alpha, alpha >= 0, ">= 0")
    check_argument("gradnorm", "lr", lr, lr > 0, "> 0")
    weight_optimizer = optax.adam(lr)

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("gradnorm", num_tasks)
        weights = jnp.ones((num_tasks,), dtype)
        return NoState(), GradNormState(
            weights,
            weight_optimizer.init(weights),
            jnp.ones_like(weights),
            jnp.zeros((), jnp.int32),
        )

    def combine(task_grads, task_losses, weights, state):
        weights = jax.lax.stop_gradient(weights)
        combined = combine_with(weights, task_grads)
        num_tasks = weights.shape[0]
        grad_norms = task_norms(task_grads)
        losses = jax.lax.stop_gradient(task_losses).astype(state.weights.dtype)
        initial = jnp.where(state.steps == 0, losses, state.initial_losses)
        ratios = losses / jnp.maximum(initial, jnp.finfo(losses.dtype).tiny)
        grad = gradnorm_weight_gradient(
            state.weights, grad_norms.astype(state.weights.dtype), ratios, alpha
        )
        updates, opt_state = weight_optimizer.update(grad, state.opt_state, state.weights)
        new = jnp.maximum(optax.apply_updates(state.weights, updates), 1e-3)
        new = num_tasks * new / jnp.sum(new)
        return combined, GradNormState(new, opt_state, initial, state.steps + 1)

    return MTLMethod(
        init=init, loss=state_weights_loss("gradnorm"), combine=combine, needs_task_grads=True
    )


class DBMTLState(NamedTuple):
    buffers: jax.Array  # pytree like the shared parameters, leading task axis: EMA of grad log l_t
    steps: jax.Array  # ()


def db_mtl(beta: float = 0.9, beta_sigma: float = 0.5) -> MTLMethod:
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", 2023): the losses
    are log-transformed (``total = sum_t log(l_t + 1e-8)``, so ``w_t = 1 / (l_t + 1e-8)``),
    each task's shared gradient ``w_t g_t`` is averaged over steps, ``m_t <- g + b_k (m_t -
    g)`` with ``b_k = beta / k^beta_sigma`` at step k = 1, 2, ..., and the shared gradient
    is ``sum_t (max_s ||m_s|| / ||m_t||) m_t``: every task's average scaled to the largest
    norm. The heads get ``grad log l_t``. The averages are parameter-shaped state (T
    copies of the encoder's gradient), in the checkpoint."""

    check_argument("db_mtl", "beta", beta, 0 <= beta < 1, "in [0, 1)")
    check_argument("db_mtl", "beta_sigma", beta_sigma, beta_sigma >= 0, ">= 0")

    def init(num_tasks, dtype=jnp.float32, shared=None):
        check_num_tasks("db_mtl", num_tasks)
        if shared is None:
            raise ValueError(
                "db_mtl: init needs the shared parameters (shared=...) to shape its buffers"
            )
        buffers = jax.tree_util.tree_map(
            lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), shared
        )
        return NoState(), DBMTLState(buffers, jnp.zeros((), jnp.int32))

    def loss(params, task_losses, state):
        del params, state
        check_losses("db_mtl", task_losses)
        shifted = task_losses + 1e-8
        return jnp.sum(jnp.log(shifted)), jax.lax.stop_gradient(1.0 / shifted)

    def combine(task_grads, task_losses, weights, state):
        del task_losses
        weights = jax.lax.stop_gradient(weights)
        steps = state.steps + 1
        decay = beta / steps.astype(weights.dtype) ** beta_sigma

        def average(g, m):
            g = g * weights.astype(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1))
            return g + decay.astype(g.dtype) * (m - g)

        buffers = jax.tree_util.tree_map(average, task_grads, state.buffers)
        norms = task_norms(buffers)
        scale = jnp.max(norms) / (norms + 1e-8)
        return combine_with(scale, buffers), DBMTLState(buffers, steps)

    return MTLMethod(
        init=init, loss=loss, combine=combine, needs_task_grads=True, shared_state=True
    )


METHODS = {"gradnorm": gradnorm, "db_mtl": db_mtl}
