"""Auto-lambda: task weights learned from a one-step look-ahead on held-out data.

Liu, Liang, Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022.
Before each step the task weights ``lambda`` take one Adam step on the hypergradient
``d/d lambda  L_val(theta'(lambda))``, where ``theta'`` is the model after the virtual
step the optimizer would take on ``sum_t lambda_t l_t`` of the training batch and
``L_val`` is the sum of the task losses on another batch (the original draws it from a
second, differently shuffled pass over the training set). The step then trains on
``sum_t lambda_t l_t`` with the new weights.

The original approximates the hypergradient: ``-alpha (dL(theta + eps d) - dL(theta -
eps d)) / 2 eps`` with ``d = grad L_val(theta')`` and ``eps = 0.01 / ||d||``, a finite
difference of the Hessian-vector product, for SGD's step. Here ``hypergradient="exact"``
differentiates through the virtual step itself (``jax.grad``), for any optax optimizer:
since the training loss is linear in ``lambda`` the network is differentiated once more
at ``theta'`` and the per-task gradients the step already has do the rest.
``hypergradient="finite_difference"`` is the original's estimate, generalised from SGD
(``d theta' / d g = -alpha``) to the optimizer's own Jacobian.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgr_jax.methods.base import (
    LookAhead,
    MTLMethod,
    NoState,
    check_argument,
    check_num_tasks,
    state_weights_loss,
)

HYPERGRADIENTS = ("exact", "finite_difference")


class AutoLambdaState(NamedTuple):
    weights: jax.Array  # (T,): lambda
    opt_state: optax.OptState  # the meta-optimizer's (Adam) state
    hypergradient: jax.Array  # (T,): the last step's d L_val / d lambda


def _weighted_grads(context, weights):
    # lambda enters only here, so the exact hypergradient is a VJP of this sum.
    if context.weighted_grads is not None:
        return context.weighted_grads(weights)
    return jax.tree_util.tree_map(
        lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), context.task_grads
    )


def exact_hypergradient(context: LookAhead, weights: jax.Array) -> jax.Array:
    """``d L_val(theta'(lambda)) / d lambda`` by differentiating through the virtual step."""
    return jax.grad(
        lambda w: jnp.sum(context.heldout_losses(context.virtual_step(_weighted_grads(context, w))))
    )(weights)


def finite_difference_hypergradient(context: LookAhead, weights: jax.Array) -> jax.Array:
    """The original's estimate: ``v = (d theta'/d g)^T grad L_val(theta')`` (``-alpha d``
    for SGD), then ``<grad l_t(theta), v>`` by a central difference of the training losses
    at ``theta +- eps v``, ``eps = 0.01 / ||v||``."""
    grads = _weighted_grads(context, weights)
    after, step_vjp = jax.vjp(context.virtual_step, grads)
    d = jax.grad(lambda p: jnp.sum(context.heldout_losses(p)))(after)
    (v,) = step_vjp(d)
    norm = optax.tree.norm(v)
    eps = 0.01 / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)

    def shifted(sign):
        return jax.tree_util.tree_map(lambda p, x: p + sign * eps * x, context.params, v)

    return (context.task_losses(shifted(1.0)) - context.task_losses(shifted(-1.0))) / (2 * eps)


def autol(initial_weight: float = 0.1, lr: float = 1e-4, hypergradient: str = "exact") -> MTLMethod:
    """Auto-lambda in the multi-task setting (every task primary), as auto-lambda's and
    the DGR repository's trainers run it: weights from ``initial_weight`` (0.1), Adam
    with ``lr`` (1e-4) on the hypergradient, the held-out batch from a second shuffle of
    the training set. ``hypergradient``: ``"exact"`` or ``"finite_difference"`` (the
    original's). The virtual step is the optimizer's real update (momentum and weight
    decay included, as the original's ``virtual_step``; with Adam, SGD at Adam's learning
    rate, as the original: ``make_train_step``'s ``lookahead_optimizer``) on the task
    losses alone; DGR's
    gradient joins only the real step. The original's extra training-mode forwards also
    move BatchNorm's running statistics; here they do not."""
    if hypergradient not in HYPERGRADIENTS:
        raise ValueError(
            f"autol: hypergradient must be one of {HYPERGRADIENTS}, got {hypergradient!r}"
        )
    check_argument("autol", "lr", lr, lr > 0, "> 0")
    check_argument("autol", "initial_weight", initial_weight, initial_weight > 0, "> 0")
    meta_optimizer = optax.adam(lr)
    estimate = exact_hypergradient if hypergradient == "exact" else finite_difference_hypergradient

    def init(num_tasks, dtype=jnp.float32):
        check_num_tasks("autol", num_tasks)
        weights = jnp.full((num_tasks,), initial_weight, dtype)
        return NoState(), AutoLambdaState(
            weights, meta_optimizer.init(weights), jnp.zeros((num_tasks,), dtype)
        )

    def lookahead(state, context):
        hyper = estimate(context, state.weights).astype(state.weights.dtype)
        updates, opt_state = meta_optimizer.update(hyper, state.opt_state, state.weights)
        return AutoLambdaState(optax.apply_updates(state.weights, updates), opt_state, hyper)

    def metrics(state):
        return {"hypergradient_norm": jnp.linalg.norm(state.hypergradient)}

    return MTLMethod(
        init=init,
        loss=state_weights_loss("autol"),
        needs_task_grads=True,
        lookahead=lookahead,
        metrics=metrics,
    )


METHODS = {"autol": autol}
