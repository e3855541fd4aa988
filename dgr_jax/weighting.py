"""Multi-task methods behind one interface: loss weighting and gradient combination.

A method is an :class:`MTLMethod`, a NamedTuple of pure functions in the spirit of an
optax transform. Loss-weighting methods (equal, DWA, uncertainty; later Auto-lambda)
and gradient methods (later PCGrad, CAGrad, IMTL, Nash-MTL, ...) fill in the same
fields, so the train step never asks which method it runs:

``init(num_tasks, dtype=float32) -> (params, state)``
    ``params``: learnable method parameters (uncertainty's log-variances; ``{}`` for
    most methods). They live in ``TrainState.params["method"]`` and are trained by the
    model's optimizer. ``state``: everything else (DWA's loss history, a PRNG key for
    a randomised method, a solver's warm start); a pytree of arrays.
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
``decay_params``
    Whether ``params`` get the model's weight decay (the original code puts uncertainty's
    log-variances in the same SGD parameter group as the network's weights).
``needs_task_grads``
    False: the step differentiates ``total + lambda * P`` once (the cheap path; by
    linearity it equals ``weighted_sum`` of the task gradients plus the DGR gradient).
    True: the step takes the per-task gradients of the shared parameters (one vmapped
    VJP), calls ``combine`` and only then adds DGR's gradient ``lambda * grad P``, as the
    original code does; task heads and method parameters still get ``grad total``.

A train step using it; ``objective(model) -> (task_losses, dgr_term)`` runs the encoder
once (``dgr_term = lambda * P``), ``params = {"encoder", "heads", "method"}``::

    model_of = lambda p: {"encoder": p["encoder"], "heads": p["heads"]}
    if not method.needs_task_grads:
        def f(params):
            losses, dgr_term = objective(model_of(params))
            total, w = method.loss(params["method"], losses, mstate)
            return total + dgr_term, (losses, w)
        grads, (losses, w) = jax.grad(f, has_aux=True)(params)
    else:
        (losses, dgr_term), vjp = jax.vjp(objective, model_of(params))  # one forward
        cotangents = jnp.eye(T + 1, dtype=losses.dtype)               # T tasks, then DGR
        rows = jax.vmap(lambda c: vjp((c[:T], c[T]))[0])(cotangents)  # one vmapped VJP
        task_grads, dgr_grads = tree_map(lambda g: g[:T], rows), tree_map(lambda g: g[T], rows)
        (_, w), method_grads = jax.value_and_grad(method.loss, has_aux=True)(
            params["method"], losses, mstate)
        encoder, mstate = method.combine(task_grads["encoder"], losses, w, mstate)
        heads, _ = weighted_sum(task_grads["heads"], losses, w, mstate)
        grads = tree_map(jnp.add, {"encoder": encoder, "heads": heads}, dgr_grads)  # DGR last
        grads["method"] = method_grads
    mstate = method.update(mstate, jax.lax.stop_gradient(losses), batch_size)

Methods that fall outside one step's gradient (Auto-lambda's meta step on validation
data, GradNorm's weight update) keep their weights in ``state`` and bring their own
update function next to this interface.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def weighted_sum(task_grads: PyTree, task_losses: jax.Array, weights: jax.Array,
                 state: PyTree) -> tuple[PyTree, PyTree]:
    """``sum_t w_t g_t`` over the leading task axis of every leaf; state unchanged."""
    del task_losses
    weights = jax.lax.stop_gradient(weights)

    def combine_leaf(g):
        if g.shape[:1] != weights.shape:
            raise ValueError(f"weighted_sum: task gradients have leading axis {g.shape[:1]}, "
                             f"weights have shape {weights.shape}")
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)

    return jax.tree_util.tree_map(combine_leaf, task_grads), state


def _unchanged_after_step(state: PyTree, task_losses: jax.Array, num_examples: int | jax.Array = 1) -> PyTree:
    del task_losses, num_examples
    return state


def _unchanged(state: PyTree) -> PyTree:
    return state


class MTLMethod(NamedTuple):
    """A multi-task method; see the module docstring for each field's contract."""

    init: Callable[..., tuple[PyTree, PyTree]]
    loss: Callable[[PyTree, jax.Array, PyTree], tuple[jax.Array, jax.Array]]
    combine: Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[PyTree, PyTree]] = weighted_sum
    update: Callable[..., PyTree] = _unchanged_after_step
    end_epoch: Callable[[PyTree], PyTree] = _unchanged
    needs_task_grads: bool = False
    decay_params: bool = False


def _check_num_tasks(name: str, num_tasks: int) -> None:
    if num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be >= 1, got {num_tasks}")


def _check_losses(name: str, task_losses: jax.Array, num_tasks: int | None = None) -> None:
    if task_losses.ndim != 1 or (num_tasks is not None and task_losses.shape[0] != num_tasks):
        expected = "(T,)" if num_tasks is None else f"({num_tasks},)"
        raise ValueError(f"{name}: task_losses must have shape {expected}, got {task_losses.shape}")


def equal() -> MTLMethod:
    """Equal weighting: ``total = sum_t l_t``, every weight 1."""

    def init(num_tasks, dtype=jnp.float32):
        del dtype
        _check_num_tasks("equal", num_tasks)
        return {}, {}

    def loss(params, task_losses, state):
        del params, state
        _check_losses("equal", task_losses)
        return jnp.sum(task_losses), jnp.ones_like(task_losses)

    return MTLMethod(init=init, loss=loss)


def dwa(temperature: float = 2.0) -> MTLMethod:
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    In epoch ``e`` (0-based) ``w_t = T softmax_t(r_t / temperature)`` with
    ``r_t = L_t(e-1) / L_t(e-2)``, ``L_t`` the epoch-average training loss of task t;
    ``w_t = 1`` in epochs 0 and 1. The weights are constants for the gradient. The
    epoch average weighs each step's loss by its batch's number of examples, as the
    original code's running mean does (a short last batch of b examples in batches of B
    counts b/B of a step).

    State: ``epoch_losses`` ``(2, T)`` = ``[L(e-2), L(e-1)]``, ``loss_sum`` ``(T,)`` (losses
    times examples) and ``num_steps`` (examples) for the current epoch, ``epoch``
    (completed epochs). ``update`` adds a step's losses; ``end_epoch`` turns the running
    sum into ``L(e)`` and rolls the history (an epoch without steps repeats the previous
    average).
    """
    if not temperature > 0:
        raise ValueError(f"dwa: temperature must be > 0, got {temperature}")

    def init(num_tasks, dtype=jnp.float32):
        _check_num_tasks("dwa", num_tasks)
        return {}, {
            "epoch_losses": jnp.ones((2, num_tasks), dtype),
            "loss_sum": jnp.zeros((num_tasks,), dtype),
            "num_steps": jnp.zeros((), jnp.int32),
            "epoch": jnp.zeros((), jnp.int32),
        }

    def weights_of(state):
        before_last, last = state["epoch_losses"]
        num_tasks = last.shape[0]
        adaptive = num_tasks * jax.nn.softmax(last / before_last / temperature)
        return jnp.where(state["epoch"] >= 2, adaptive, jnp.ones_like(adaptive))

    def loss(params, task_losses, state):
        del params
        _check_losses("dwa", task_losses, state["loss_sum"].shape[0])
        weights = jax.lax.stop_gradient(weights_of(state)).astype(task_losses.dtype)
        return jnp.sum(weights * task_losses), weights

    def update(state, task_losses, num_examples=1):
        _check_losses("dwa", task_losses, state["loss_sum"].shape[0])
        step_losses = jax.lax.stop_gradient(task_losses).astype(state["loss_sum"].dtype)
        count = jnp.asarray(num_examples, jnp.int32)
        return {**state, "loss_sum": state["loss_sum"] + count.astype(step_losses.dtype) * step_losses,
                "num_steps": state["num_steps"] + count}

    def end_epoch(state):
        num_steps = state["num_steps"]
        mean = state["loss_sum"] / jnp.maximum(num_steps, 1).astype(state["loss_sum"].dtype)
        latest = jnp.where(num_steps > 0, mean, state["epoch_losses"][1])
        return {
            "epoch_losses": jnp.stack([state["epoch_losses"][1], latest]),
            "loss_sum": jnp.zeros_like(state["loss_sum"]),
            "num_steps": jnp.zeros_like(num_steps),
            "epoch": state["epoch"] + 1,
        }

    return MTLMethod(init=init, loss=loss, update=update, end_epoch=end_epoch)


def uncertainty(initial_log_var: float = -0.7, scale: float = 0.5, weight_decay: bool = True) -> MTLMethod:
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Learnable ``w_t`` (params ``{"log_var": (T,)}``) and

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
        _check_num_tasks("uncertainty", num_tasks)
        return {"log_var": jnp.full((num_tasks,), initial_log_var, dtype)}, {}

    def loss(params, task_losses, state):
        del state
        log_var = params["log_var"]
        _check_losses("uncertainty", task_losses, log_var.shape[0])
        precision = jnp.exp(-log_var)
        return scale * jnp.sum(precision * task_losses + log_var), scale * precision

    return MTLMethod(init=init, loss=loss, decay_params=bool(weight_decay))


METHODS: dict[str, Callable[..., MTLMethod]] = {
    "equal": equal,
    "dwa": dwa,
    "uncertainty": uncertainty,
}


def method_arguments(name: str) -> dict[str, Any]:
    """The hyper-parameters of ``METHODS[name]`` and their defaults (each paper's values)."""
    if name not in METHODS:
        raise ValueError(f"unknown MTL method {name!r}; valid: {', '.join(METHODS)}")
    return {p.name: p.default for p in inspect.signature(METHODS[name]).parameters.values()}


def get_method(name: str, **kwargs) -> MTLMethod:
    """``METHODS[name](**kwargs)``; an unknown name or argument raises a one-line ValueError."""
    known = method_arguments(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise ValueError(f"MTL method {name!r} has no argument {', '.join(unknown)}; its arguments: {listing}")
    return METHODS[name](**kwargs)
