"""Loss-weighting methods: ``total = sum_t w_t l_t`` (+ a regulariser of the weights).

Each factory returns an :class:`~dgr_jax.methods.base.MTLMethod`; its keyword arguments
are the method's hyper-parameters with their papers' (or the original code's) values.
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
)


def equal() -> MTLMethod:
    """Equal weighting: ``total = sum_t l_t``, every weight 1."""

    def init(num_tasks, dtype=jnp.float32):
        del dtype
        check_num_tasks("equal", num_tasks)
        return NoState(), NoState()

    def loss(params, task_losses, state):
        del params, state
        check_losses("equal", task_losses)
        return jnp.sum(task_losses), jnp.ones_like(task_losses)

    return MTLMethod(init=init, loss=loss)


class DWAState(NamedTuple):
    epoch_losses: jax.Array  # (2, T): [L(e-2), L(e-1)], the last two epochs' average losses
    loss_sum: jax.Array  # (T,): this epoch's losses, each times its batch's examples
    num_examples: jax.Array  # (): examples seen this epoch
    epoch: jax.Array  # (): completed epochs


def dwa(temperature: float = 2.0) -> MTLMethod:
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    In epoch ``e`` (0-based) ``w_t = T softmax_t(r_t / temperature)`` with
    ``r_t = L_t(e-1) / L_t(e-2)``, ``L_t`` the epoch-average training loss of task t;
    ``w_t = 1`` in epochs 0 and 1. The weights are constants for the gradient. The
    epoch average weighs each step's loss by its batch's number of examples, as the
    original code's running mean does (a short last batch of b examples in batches of B
    counts b/B of a step).

    ``update`` adds a step's losses to :class:`DWAState`; ``end_epoch`` turns the running
    sum into ``L(e)`` and rolls the history (an epoch without steps repeats the previous
    average).
    """
    if not temperature > 0:
        raise ValueError(f"dwa: temperature must be > 0, got {temperature}")

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("dwa", num_tasks)
        return NoState(), DWAState(
            epoch_losses=jnp.ones((2, num_tasks), dtype),
            loss_sum=jnp.zeros((num_tasks,), dtype),
            num_examples=jnp.zeros((), jnp.int32),
            epoch=jnp.zeros((), jnp.int32),
        )

    def weights_of(state):
        before_last, last = state.epoch_losses
        num_tasks = last.shape[0]
        adaptive = num_tasks * jax.nn.softmax(last / before_last / temperature)
        return jnp.where(state.epoch >= 2, adaptive, jnp.ones_like(adaptive))

    def loss(params, task_losses, state):
        del params
        check_losses("dwa", task_losses, state.loss_sum.shape[0])
        weights = jax.lax.stop_gradient(weights_of(state)).astype(task_losses.dtype)
        return jnp.sum(weights * task_losses), weights

    def update(state, task_losses, num_examples=1):
        check_losses("dwa", task_losses, state.loss_sum.shape[0])
        step_losses = jax.lax.stop_gradient(task_losses).astype(state.loss_sum.dtype)
        count = jnp.asarray(num_examples, jnp.int32)
        return state._replace(
            loss_sum=state.loss_sum + count.astype(step_losses.dtype) * step_losses,
            num_examples=state.num_examples + count,
        )

    def end_epoch(state):
        seen = state.num_examples
        mean = state.loss_sum / jnp.maximum(seen, 1).astype(state.loss_sum.dtype)
        latest = jnp.where(seen > 0, mean, state.epoch_losses[1])
        return DWAState(
            epoch_losses=jnp.stack([state.epoch_losses[1], latest]),
            loss_sum=jnp.zeros_like(state.loss_sum),
            num_examples=jnp.zeros_like(seen),
            epoch=state.epoch + 1,
        )

    return MTLMethod(init=init, loss=loss, update=update, end_epoch=end_epoch)


class UncertaintyParams(NamedTuple):
    log_var: jax.Array  # (T,): w_t, one log-variance per task


def uncertainty(
    initial_log_var: float = -0.7, scale: float = 0.5, weight_decay: bool = True
) -> MTLMethod:
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Learnable ``w_t`` (:class:`UncertaintyParams`) and

        total = scale * sum_t (exp(-w_t) l_t + w_t),    weights = scale * exp(-w_t).

    The defaults are the original code's (auto-lambda / the DGR repository):
    ``sum_t l_t / (2 exp(w_t)) + w_t / 2`` from ``w_t = -0.7`` (weights 1.007 at the
    start), with the log-variances weight-decayed like the network's weights. Kendall et
    al.'s ``exp(-s) l + s`` from 0, without decay, is ``scale=1.0, initial_log_var=0.0,
    weight_decay=False``: the same optimum ``w_t* = log l_t``, weights twice as large.
    """
    if not scale > 0:
        raise ValueError(f"uncertainty: scale must be > 0, got {scale}")

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("uncertainty", num_tasks)
        return UncertaintyParams(jnp.full((num_tasks,), initial_log_var, dtype)), NoState()

    def loss(params, task_losses, state):
        del state
        log_var = params.log_var
        check_losses("uncertainty", task_losses, log_var.shape[0])
        precision = jnp.exp(-log_var)
        return scale * jnp.sum(precision * task_losses + log_var), scale * precision

    return MTLMethod(init=init, loss=loss, decay_params=bool(weight_decay))


class RLWState(NamedTuple):
    key: jax.Array  # this step's weights come from it; ``update`` advances it


def rlw() -> MTLMethod:
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting",
    TMLR 2022): each step ``w = softmax(z)``, ``z ~ N(0, I)``, from the state's PRNG key
    (the weights sum to 1, as in the paper), constants for the gradient."""

    def init(num_tasks, dtype=jnp.float32):
        del dtype
        check_num_tasks("rlw", num_tasks)
        return NoState(), RLWState(key=jax.random.PRNGKey(num_tasks))

    def loss(params, task_losses, state):
        del params
        check_losses("rlw", task_losses)
        z = jax.random.normal(state.key, task_losses.shape, task_losses.dtype)
        weights = jax.lax.stop_gradient(jax.nn.softmax(z))
        return jnp.sum(weights * task_losses), weights

    def update(state, task_losses, num_examples=1):
        del task_losses, num_examples
        return RLWState(key=jax.random.split(state.key)[0])

    return MTLMethod(init=init, loss=loss, update=update)


class FAMOState(NamedTuple):
    logits: jax.Array  # (T,): xi, the weights are softmax(xi)
    opt_state: optax.OptState  # the logits' Adam state
    min_losses: jax.Array  # (T,): each loss's lower bound (0 for the scene losses)


def famo(gamma: float = 0.01, w_lr: float = 0.025, max_norm: float = 1.0) -> MTLMethod:
    """FAMO (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023):
    ``total = sum_t z_t log(l_t - b_t) / c`` with ``z = softmax(xi)``, ``c = sum_t z_t /
    (l_t - b_t)`` a constant, so ``w_t = z_t / (c (l_t - b_t))``. After the step the
    logits take one Adam step (``w_lr``, weight decay ``gamma``) on ``J_softmax^T delta``,
    ``delta`` each log-loss's decrease on the same batch, which costs a forward
    (``after_update``). ``max_norm``: the shared gradient is clipped to it, as the
    original's ``backward`` clips the shared parameters' (0: no clipping)."""
    if not max_norm >= 0:
        raise ValueError(f"famo: max_norm must be >= 0 (0: no clipping), got {max_norm}")
    if not w_lr > 0:
        raise ValueError(f"famo: w_lr must be > 0, got {w_lr}")
    check_argument("famo", "gamma", gamma, gamma >= 0, ">= 0")
    # torch's Adam(weight_decay=gamma) adds gamma * xi to the gradient before the moments.
    logit_optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))
    eps = 1e-8  # the original's

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("famo", num_tasks)
        logits = jnp.zeros((num_tasks,), dtype)
        return NoState(), FAMOState(logits, logit_optimizer.init(logits), jnp.zeros_like(logits))

    def loss(params, task_losses, state):
        del params
        check_losses("famo", task_losses, state.logits.shape[0])
        z = jax.nn.softmax(state.logits).astype(task_losses.dtype)
        gap = task_losses - state.min_losses.astype(task_losses.dtype) + eps
        c = jax.lax.stop_gradient(jnp.sum(z / gap))
        return jnp.sum(jnp.log(gap) * z) / c, jax.lax.stop_gradient(z / (c * gap))

    def after_update(state, task_losses, task_losses_after):
        def log_gap(losses):
            return jnp.log(losses.astype(state.logits.dtype) - state.min_losses + eps)

        delta = log_gap(task_losses) - log_gap(task_losses_after)
        _, softmax_vjp = jax.vjp(jax.nn.softmax, state.logits)
        (grad,) = softmax_vjp(delta)
        updates, opt_state = logit_optimizer.update(grad, state.opt_state, state.logits)
        return state._replace(
            logits=optax.apply_updates(state.logits, updates), opt_state=opt_state
        )

    return MTLMethod(init=init, loss=loss, after_update=after_update, max_shared_norm=max_norm)


METHODS = {"equal": equal, "dwa": dwa, "uncertainty": uncertainty, "rlw": rlw, "famo": famo}
