"""Train state and the pure train step: ``step(state, batch) -> (state, metrics)``.

The step differentiates ``objective.task_losses_and_penalty`` with respect to the
encoder and task-head parameters; the dummy sets live in the state but are never
differentiated, updated or decayed. The MTL method (``dgr_jax.methods``) turns the task
losses, or for gradient methods the per-task gradients of the encoder, into one
gradient; DGR's gradient is added after it. With ``dgr.estimator == "paper"`` the
original finite-difference algorithm supplies the encoder's DGR gradient instead (added
after the task gradients, as the original code does), and the BatchNorm running
statistics are updated K + 1 times, as the original's extra train-mode forwards update
them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dgr_jax import methods
from dgr_jax.methods import LookAhead, MTLMethod, per_task_gradients, weighted_sum
from dgr_jax.methods.base import clip_by_norm
from dgr_jax.models import MultiTaskNet
from dgr_jax.objective import (
    DGRConfig,
    encode,
    paper_dgr_encoder_grads,
    repeat_running_stats_update,
    task_losses_and_penalty,
    task_losses_and_penalty_on_features,
)
from dgr_jax.penalty import init_dummy_sets
from dgr_jax.tasks import Task

PyTree = Any


@flax.struct.dataclass
class TrainState:
    params: PyTree  # {"encoder", "heads", "method"}: what the optimizer updates
    batch_stats: PyTree
    dummy_sets: PyTree  # K stacked head sets, fixed for the whole run
    opt_state: PyTree
    method_state: PyTree  # the MTL method's state (DWA's loss history, ...)
    step: jax.Array
    rng: jax.Array


def init_train_state(
    net: MultiTaskNet,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    sample_images: jax.Array,
    num_dummy: int,
    method: MTLMethod | None = None,
    num_tasks: int | None = None,
) -> TrainState:
    """Initialise model, K dummy sets (independent keys), method and optimizer state.
    Pure: ``jax.eval_shape`` of it is the state's structure (for restoring)."""
    method = method or methods.equal()
    key_model, key_dummy, key_rng = jax.random.split(key, 3)
    variables = net.init(key_model, sample_images, train=False)
    features, outputs = net.apply(variables, sample_images, train=False)
    dummy_sets = init_dummy_sets(
        net.heads, key_dummy, num_dummy, features, sample_images.shape[1:3], train=False
    )
    shared = {"shared": variables["params"]["encoder"]} if method.shared_state else {}
    method_params, method_state = method.init(num_tasks or len(outputs), **shared)
    params = {**variables["params"], "method": method_params}
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        dummy_sets=dummy_sets,
        opt_state=optimizer.init(params),
        method_state=method_state,
        step=jnp.zeros((), jnp.int32),
        rng=key_rng,
    )


def make_train_step(
    net: MultiTaskNet,
    tasks: Sequence[Task],
    dgr: DGRConfig,
    optimizer: optax.GradientTransformation,
    method: MTLMethod | None = None,
    lookahead_optimizer: optax.GradientTransformation | None = None,
):
    """A pure ``step(state, batch) -> (state, metrics)``; jit it with the state donated.

    ``lookahead_optimizer``: for a method with ``lookahead``, the optimizer of its virtual
    step, applied from a fresh state (None: ``optimizer`` with the step's state).

    Loss-weighting methods take one backward pass of ``total + lambda * P`` (the gradient
    is linear); gradient methods (``method.needs_task_grads``) get the per-task gradients
    from ``methods.per_task_gradients`` (T + 1 VJPs sharing one forward), combine the
    encoder's, and DGR's gradient is added after the combination. Representation-level
    methods (``method.level == "representation"``) get the per-task gradients of the
    shared features instead (VJPs through the heads only), and the combined feature
    gradient plus DGR's goes back through the encoder in one VJP.
    """
    method = method or methods.equal()
    num_tasks = len(tasks)
    paper = dgr.estimator == "paper" and dgr.on
    penalty_on = dgr.on and not paper  # the objective's penalty term is not identically 0

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng, dropout_rng = jax.random.split(state.rng)
        batch, heldout = split_heldout(batch)
        if method.lookahead is not None and not heldout:
            raise ValueError(
                f"this method looks ahead on a held-out batch: the batch needs '{HELDOUT}<name>' keys"
            )
        params = state.params

        def losses_at(model_params, batch, rng):
            """The task losses alone (training mode; BatchNorm's updates dropped)."""
            return task_losses_and_penalty(
                net,
                tasks,
                DGRConfig(),
                model_params,
                state.batch_stats,
                state.dummy_sets,
                batch,
                rng,
            )[0]

        def virtual_step(model_grads):
            """The parameters the optimizer would give for ``model_grads`` (differentiable)."""
            grads = {
                **model_grads,
                "method": jax.tree_util.tree_map(jnp.zeros_like, params["method"]),
            }
            if lookahead_optimizer is None:
                updates, _ = optimizer.update(grads, state.opt_state, params)
            else:
                updates, _ = lookahead_optimizer.update(
                    grads, lookahead_optimizer.init(params), params
                )
            after = optax.apply_updates(params, updates)
            return {"encoder": after["encoder"], "heads": after["heads"]}

        def objective(model_params):
            per_task, penalty, batch_stats = task_losses_and_penalty(
                net,
                tasks,
                dgr,
                model_params,
                state.batch_stats,
                state.dummy_sets,
                batch,
                dropout_rng,
            )
            return (per_task, dgr.weight * penalty), (penalty, batch_stats)

        model_params = {"encoder": params["encoder"], "heads": params["heads"]}
        if not method.needs_task_grads:

            def total_loss(params):
                (per_task, dgr_term), (penalty, batch_stats) = objective(
                    {"encoder": params["encoder"], "heads": params["heads"]}
                )
                total, weights = method.loss(params["method"], per_task, state.method_state)
                return (total, dgr_term), (per_task, weights, penalty, batch_stats)

            (total, dgr_term), vjp, (per_task, weights, penalty, batch_stats) = jax.vjp(
                total_loss, params, has_aux=True
            )
            one, zero = jnp.ones_like(total), jnp.zeros_like(total)
            if method.max_shared_norm:  # clip the task part, then add DGR's (2 VJPs with DGR)
                (grads,) = vjp((one, zero))
                grads = {**grads, "encoder": clip_by_norm(grads["encoder"], method.max_shared_norm)}
                if dgr.on:
                    grads = jax.tree_util.tree_map(jnp.add, grads, vjp((zero, one))[0])
            else:
                (grads,) = vjp((one, one))
            total = total + dgr_term
            method_state = state.method_state
        elif method.level == "parameters":
            per_task, dgr_term, task_grads, dgr_grads, (penalty, batch_stats) = per_task_gradients(
                objective, model_params, num_tasks, with_extra=penalty_on
            )
            method_state = state.method_state
            if method.lookahead is not None:
                method_state = method.lookahead(
                    method_state,
                    LookAhead(
                        params=model_params,
                        task_grads=task_grads,
                        virtual_step=virtual_step,
                        task_losses=lambda p: losses_at(p, batch, dropout_rng),
                        heldout_losses=lambda p: losses_at(p, heldout, dropout_rng),
                    ),
                )
            (method_total, weights), method_grads = jax.value_and_grad(method.loss, has_aux=True)(
                params["method"], per_task, method_state
            )
            encoder, method_state = method.combine(
                task_grads["encoder"], per_task, weights, method_state
            )
            encoder = clip_by_norm(encoder, method.max_shared_norm)
            heads = _head_grads(method, task_grads["heads"], per_task, weights, method_state)
            grads = jax.tree_util.tree_map(jnp.add, {"encoder": encoder, "heads": heads}, dgr_grads)
            grads["method"] = method_grads
            total = method_total + dgr_term
        else:  # "representation": combine d l_t / d features, backpropagate the encoder once
            if method.max_shared_norm or method.lookahead is not None:
                raise ValueError(
                    "representation-level methods support neither max_shared_norm nor lookahead"
                )
            features, encoder_vjp, encoder_stats = jax.vjp(
                lambda p: encode(net, p, state.batch_stats, batch["image"], dropout_rng),
                params["encoder"],
                has_aux=True,
            )
            if isinstance(features, Mapping):
                raise ValueError(
                    f"{method.level}-level methods need one shared representation; this "
                    f"network's features are per task ({', '.join(features)}): use a Split network"
                )

            def on_features(p):
                per_task, penalty, head_stats = task_losses_and_penalty_on_features(
                    net,
                    tasks,
                    dgr,
                    p["heads"],
                    state.batch_stats,
                    state.dummy_sets,
                    p["features"],
                    batch,
                    dropout_rng,
                )
                return (per_task, dgr.weight * penalty), (penalty, head_stats)

            per_task, dgr_term, task_grads, dgr_grads, (penalty, head_stats) = per_task_gradients(
                on_features,
                {"heads": params["heads"], "features": features},
                num_tasks,
                with_extra=penalty_on,
            )
            (method_total, weights), method_grads = jax.value_and_grad(method.loss, has_aux=True)(
                params["method"], per_task, state.method_state
            )
            combined, method_state = method.combine(
                task_grads["features"], per_task, weights, state.method_state
            )
            (encoder,) = encoder_vjp(
                jax.tree_util.tree_map(jnp.add, combined, dgr_grads["features"])
            )
            heads = _head_grads(method, task_grads["heads"], per_task, weights, method_state)
            grads = {
                "encoder": encoder,
                "heads": jax.tree_util.tree_map(jnp.add, heads, dgr_grads["heads"]),
                "method": method_grads,
            }
            batch_stats = {**state.batch_stats, "encoder": encoder_stats}
            if head_stats:
                batch_stats["heads"] = head_stats
            total = method_total + dgr_term
        if paper:
            extra = paper_dgr_encoder_grads(
                net, tasks, dgr, model_params, state.batch_stats, state.dummy_sets, batch
            )
            grads = {**grads, "encoder": jax.tree_util.tree_map(jnp.add, grads["encoder"], extra)}
            batch_stats = repeat_running_stats_update(state.batch_stats, batch_stats, dgr.num_dummy)
        method_state = method.update(
            method_state, jax.lax.stop_gradient(per_task), batch["image"].shape[0]
        )
        metrics = {f"loss/{t.name}": per_task[i] for i, t in enumerate(tasks)}
        metrics.update({f"weight/{t.name}": weights[i] for i, t in enumerate(tasks)})
        metrics["loss/total"] = total
        metrics.update({f"method/{k}": v for k, v in method.metrics(method_state).items()})
        metrics["dgr/penalty"] = penalty
        if paper:
            metrics["grad_norm/dgr_encoder"] = optax.tree.norm(extra)
        metrics["grad_norm/encoder"] = optax.tree.norm(grads["encoder"])
        metrics["grad_norm/heads"] = optax.tree.norm(grads["heads"])
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if method.after_update is not None:
            after = losses_at(
                {"encoder": new_params["encoder"], "heads": new_params["heads"]}, batch, dropout_rng
            )
            method_state = method.after_update(
                method_state, jax.lax.stop_gradient(per_task), jax.lax.stop_gradient(after)
            )
        new_state = state.replace(
            params=new_params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            method_state=method_state,
            step=state.step + 1,
            rng=rng,
        )
        return new_state, metrics

    return step


HELDOUT = "heldout/"  # the prefix of a held-out batch's keys in a step's batch


def split_heldout(batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """``(batch, heldout)``: the keys ``heldout/<name>`` make the second, unprefixed."""
    main = {k: v for k, v in batch.items() if not k.startswith(HELDOUT)}
    heldout = {k[len(HELDOUT) :]: v for k, v in batch.items() if k.startswith(HELDOUT)}
    return main, heldout


def _head_grads(method, head_task_grads, per_task, weights, method_state):
    """Each head's gradient: its task's, times the method's head weight (``weights`` for
    every method but Nash-MTL's)."""
    head_weights = method.head_weights(method_state, weights)
    return weighted_sum(head_task_grads, per_task, head_weights, method_state)[0]


def end_epoch(method: MTLMethod, state: TrainState) -> TrainState:
    """The method's once-per-epoch update (DWA rolls its loss history)."""
    return state.replace(method_state=method.end_epoch(state.method_state))


def make_eval_step(net: MultiTaskNet, tasks: Sequence[Task]):
    """A pure ``eval_step(state, batch, metric_state) -> metric_state``: inference mode
    (running BatchNorm statistics, no dropout), statistics accumulated over the whole
    evaluation set by ``dgr_jax.metrics``."""
    from dgr_jax import metrics as metric_lib

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array], metric_state):
        variables = {
            "params": {"encoder": state.params["encoder"], "heads": state.params["heads"]},
            "batch_stats": state.batch_stats,
        }
        _, outputs = net.apply(variables, batch["image"], train=False)
        return metric_lib.update_metric_state(tasks, metric_state, outputs, batch)

    return eval_step
