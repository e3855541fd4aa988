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

The gradient computation is one function of the model parameters; a comparison
regulariser (``dgr_jax.regularizers``) may call it more than once (SAM: at the ascent
point) or change the heads (PTA's decoders, ``dgr_jax.pta``), never per MTL method.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dgr_jax import methods, pta
from dgr_jax.methods import LookAhead, MTLMethod
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
from dgr_jax.regularizers import Regularizer
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
    # PTA's decoders: the dummy sets copy one head per task (``pta.base_heads``).
    dummy_sets = init_dummy_sets(
        pta.base_heads(net.heads),
        key_dummy,
        num_dummy,
        features,
        sample_images.shape[1:3],
        train=False,
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
    regularizer: Regularizer | None = None,
):
    """A pure ``step(state, batch) -> (state, metrics)``; jit it with the state donated.

    ``lookahead_optimizer``: for a method with ``lookahead``, the optimizer of its virtual
    step, applied from a fresh state (None: ``optimizer`` with the step's state).

    Loss-weighting methods take one backward pass of ``total + lambda * P`` (the gradient
    is linear). Gradient methods (``method.needs_task_grads``) run the encoder forward
    once and the heads forward and backward once, each head on its own copy of the
    features, which gives every task's gradient of the features (and DGR's) apart; then
    T VJPs of the encoder (+ 1 for DGR's) give the per-task encoder gradients that
    ``combine`` turns into one, and DGR's gradient is added after the combination. Each
    head gets its own task's gradient times ``method.head_weights``. Representation-level
    methods (``method.level == "representation"``) combine the per-task gradients of the
    features instead, and the combination plus DGR's goes back through the encoder in one
    VJP.

    All of that is one function of the model parameters, ``gradient_at``: the step calls
    it once, or ``regularizer.gradient`` calls it (SAM: twice, at ``w`` and at the ascent
    point; ``dgr_jax.regularizers``). A network with PTA's decoders (``dgr_jax.pta``)
    trains on each task's mean decoder loss and updates its decoders' running losses.
    """
    method = method or methods.equal()
    regularizer = regularizer or Regularizer()
    paper = dgr.estimator == "paper" and dgr.on
    penalty_on = dgr.on and not paper  # the objective's penalty term is not identically 0
    decoders = pta.num_decoders(net)
    if decoders and dgr.on:
        raise ValueError(
            "PTA's decoders and DGR's dummy sets do not combine: DGR's dummy sets copy one "
            "head per task; train PTA with DGR off (weight 0)"
        )
    # With PTA, task t's loss is the vector of its D decoder losses (reduced below).
    loss_tasks = pta.pseudo_tasks(tasks, decoders) if decoders else tuple(tasks)

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
            per_task = task_losses_and_penalty(
                net,
                loss_tasks,
                DGRConfig(),
                model_params,
                state.batch_stats,
                state.dummy_sets,
                batch,
                rng,
            )[0]
            return _task_means(per_task)[0]

        def gradient_at(model_params):
            """The step's gradient (encoder, heads, method) at ``model_params`` and what the
            step keeps from this pass (``_Pass``)."""
            at = {**params, **model_params}

            def virtual_step(model_grads):
                """The parameters the optimizer would give for ``model_grads`` (differentiable)."""
                grads = {
                    **model_grads,
                    "method": jax.tree_util.tree_map(jnp.zeros_like, params["method"]),
                }
                if lookahead_optimizer is None:
                    updates, _ = optimizer.update(grads, state.opt_state, at)
                else:
                    updates, _ = lookahead_optimizer.update(grads, lookahead_optimizer.init(at), at)
                after = optax.apply_updates(at, updates)
                return {"encoder": after["encoder"], "heads": after["heads"]}

            def objective(model_params):
                per_task, penalty, batch_stats = task_losses_and_penalty(
                    net,
                    loss_tasks,
                    dgr,
                    model_params,
                    state.batch_stats,
                    state.dummy_sets,
                    batch,
                    dropout_rng,
                )
                per_task, decoder_losses = _task_means(per_task)
                return (per_task, dgr.weight * penalty), (penalty, batch_stats, decoder_losses)

            extra = None
            if not method.needs_task_grads:

                def total_loss(params):
                    (per_task, dgr_term), (penalty, batch_stats, decoder_losses) = objective(
                        {"encoder": params["encoder"], "heads": params["heads"]}
                    )
                    total, weights = method.loss(params["method"], per_task, state.method_state)
                    return (total, dgr_term), (
                        per_task,
                        weights,
                        penalty,
                        batch_stats,
                        decoder_losses,
                    )

                (
                    (total, dgr_term),
                    vjp,
                    (per_task, weights, penalty, batch_stats, decoder_losses),
                ) = jax.vjp(total_loss, at, has_aux=True)
                one, zero = jnp.ones_like(total), jnp.zeros_like(total)
                if method.max_shared_norm:  # clip the task part, then add DGR's (2 VJPs with DGR)
                    (grads,) = vjp((one, zero))
                    grads = {
                        **grads,
                        "encoder": clip_by_norm(grads["encoder"], method.max_shared_norm),
                    }
                    if dgr.on:
                        grads = jax.tree_util.tree_map(jnp.add, grads, vjp((zero, one))[0])
                else:
                    (grads,) = vjp((one, one))
                total = total + dgr_term
                method_state = state.method_state
            else:
                if method.level == "representation" and (
                    method.max_shared_norm or method.lookahead is not None
                ):
                    raise ValueError(
                        "representation-level methods support neither max_shared_norm nor lookahead"
                    )
                # One encoder forward; the heads once, on a copy of the features per task.
                features, encoder_vjp, encoder_stats = jax.vjp(
                    lambda p: encode(net, p, state.batch_stats, batch["image"], dropout_rng),
                    model_params["encoder"],
                    has_aux=True,
                )
                shared = _task_feature_grads(
                    net, loss_tasks, dgr, state, model_params["heads"], features, batch, dropout_rng
                )
                per_task, dgr_term, penalty = shared.per_task, shared.dgr_term, shared.penalty
                decoder_losses = shared.decoder_losses
                method_state = state.method_state
                if method.level == "representation":
                    if isinstance(features, Mapping):
                        raise ValueError(
                            f"{method.level}-level methods need one shared representation; this "
                            f"network's features are per task ({', '.join(features)}): use a "
                            "Split network"
                        )
                    (method_total, weights), method_grads = jax.value_and_grad(
                        method.loss, has_aux=True
                    )(params["method"], per_task, method_state)
                    combined, method_state = method.combine(
                        shared.task_cotangents, per_task, weights, method_state
                    )
                    (encoder,) = encoder_vjp(jnp.add(combined, shared.dgr_cotangent))
                else:
                    # T encoder VJPs (one per task's feature gradient), + 1 for DGR's.
                    task_encoder = methods.stacked_vjps(
                        encoder_vjp, _per_task_cotangents(shared.task_cotangents, features, tasks)
                    )
                    dgr_encoder = (
                        encoder_vjp(shared.dgr_cotangent)[0]
                        if penalty_on
                        else jax.tree_util.tree_map(jnp.zeros_like, model_params["encoder"])
                    )
                    if method.lookahead is not None:
                        method_state = method.lookahead(
                            method_state,
                            LookAhead(
                                params=model_params,
                                task_grads={
                                    "encoder": task_encoder,
                                    "heads": _per_task_head_grads(shared.heads, tasks),
                                },
                                virtual_step=virtual_step,
                                task_losses=lambda p: losses_at(p, batch, dropout_rng),
                                heldout_losses=lambda p: losses_at(p, heldout, dropout_rng),
                                weighted_grads=lambda w: _weighted_model_grads(
                                    w, task_encoder, shared.heads, tasks
                                ),
                            ),
                        )
                    (method_total, weights), method_grads = jax.value_and_grad(
                        method.loss, has_aux=True
                    )(params["method"], per_task, method_state)
                    encoder, method_state = method.combine(
                        task_encoder, per_task, weights, method_state
                    )
                    encoder = clip_by_norm(encoder, method.max_shared_norm)
                    encoder = jax.tree_util.tree_map(jnp.add, encoder, dgr_encoder)
                head_weights = method.head_weights(method_state, weights)
                grads = {
                    "encoder": encoder,
                    "heads": {
                        t.name: jax.tree_util.tree_map(
                            lambda g, w=head_weights[i]: w.astype(g.dtype) * g,
                            shared.heads[t.name],
                        )
                        for i, t in enumerate(tasks)
                    },
                    "method": method_grads,
                }
                batch_stats = {**state.batch_stats, "encoder": encoder_stats}
                if shared.head_stats:
                    batch_stats["heads"] = shared.head_stats
                total = method_total + dgr_term
            if paper:
                extra, penalty = paper_dgr_encoder_grads(
                    net,
                    tasks,
                    dgr,
                    model_params,
                    state.batch_stats,
                    state.dummy_sets,
                    batch,
                    with_penalty=True,
                )
                grads = {
                    **grads,
                    "encoder": jax.tree_util.tree_map(jnp.add, grads["encoder"], extra),
                }
                batch_stats = repeat_running_stats_update(
                    state.batch_stats, batch_stats, dgr.num_dummy
                )
            if decoders:
                batch_stats = pta.record_decoder_losses(net, batch_stats, decoder_losses, tasks)
            kept = _Pass(total, per_task, weights, penalty, batch_stats, method_state, extra)
            return grads, kept

        model_params = {"encoder": params["encoder"], "heads": params["heads"]}
        if regularizer.gradient is None:
            (grads, kept), regularizer_metrics = gradient_at(model_params), {}
        else:
            grads, kept, regularizer_metrics = regularizer.gradient(gradient_at, model_params)
        per_task, weights, batch_stats = kept.per_task, kept.weights, kept.batch_stats
        method_state = method.update(
            kept.method_state, jax.lax.stop_gradient(per_task), batch["image"].shape[0]
        )
        metrics = {f"loss/{t.name}": per_task[i] for i, t in enumerate(tasks)}
        metrics.update({f"weight/{t.name}": weights[i] for i, t in enumerate(tasks)})
        metrics["loss/total"] = kept.total
        metrics.update({f"method/{k}": v for k, v in method.metrics(method_state).items()})
        metrics["dgr/penalty"] = kept.penalty
        if paper:
            metrics["grad_norm/dgr_encoder"] = optax.tree.norm(kept.paper_dgr_encoder)
        if decoders:
            chosen = pta.selected_decoders(net, batch_stats)
            metrics.update({f"pta/decoder/{name}": index for name, index in chosen.items()})
        metrics.update(regularizer_metrics)
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


class _Pass(NamedTuple):
    """What the step keeps from one pass of its gradient computation (SAM makes two and
    keeps the one at the state's parameters)."""

    total: jax.Array
    per_task: jax.Array  # (T,)
    weights: jax.Array  # (T,)
    penalty: jax.Array
    batch_stats: PyTree
    method_state: PyTree  # after lookahead and combine, before ``method.update``
    paper_dgr_encoder: PyTree | None  # the paper estimator's encoder gradient


def _task_means(per_task: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``(task losses (T,), decoder losses (T, D) or None)``: with PTA each task's loss
    is the vector of its decoders' losses, and the task's loss their mean (every
    pseudo-task weighs the same, as in PTA's joint objective)."""
    if per_task.ndim == 1:
        return per_task, None
    return jnp.mean(per_task, axis=-1), per_task


HELDOUT = "heldout/"  # the prefix of a held-out batch's keys in a step's batch


def split_heldout(batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
    """``(batch, heldout)``: the keys ``heldout/<name>`` make the second, unprefixed."""
    main = {k: v for k, v in batch.items() if not k.startswith(HELDOUT)}
    heldout = {k[len(HELDOUT) :]: v for k, v in batch.items() if k.startswith(HELDOUT)}
    return main, heldout


class _FeatureGrads(NamedTuple):
    per_task: jax.Array  # (T,) task losses
    dgr_term: jax.Array  # lambda * P
    penalty: jax.Array  # P
    decoder_losses: jax.Array | None  # PTA: (T, D) decoder losses; else None
    task_cotangents: PyTree  # d l_t / d features on a leading task axis (MTAN: task t's entry)
    dgr_cotangent: PyTree  # d (lambda P) / d features, shaped like the features
    heads: PyTree  # {task: d l_task / d its head's parameters}
    head_stats: PyTree


def _task_feature_grads(net, tasks, dgr, state, heads_params, features, batch, rng):
    """The task losses, DGR's term and their gradients with respect to the encoder's
    output and the heads, from the heads' forward and *one* backward pass: each head
    reads its own copy of the features (MTAN: its own features), the dummy sets another,
    so the copies' gradients are each task's, and DGR's, apart. Each head's parameters
    get only its task's gradient (``heads`` modules keep task ``t``'s parameters under
    ``t``); the penalty reads the dummy sets, not the heads."""
    names = [t.name for t in tasks]
    per_task_features = isinstance(features, Mapping)
    copies = dict(features) if per_task_features else {name: features for name in names}
    if set(heads_params) != set(names):
        raise ValueError(
            f"the heads' parameters must be one subtree per task named after it "
            f"({', '.join(names)}), got {', '.join(sorted(heads_params))}"
        )

    def on_features(p):
        per_task, penalty, head_stats = task_losses_and_penalty_on_features(
            net,
            tasks,
            dgr,
            p["heads"],
            state.batch_stats,
            state.dummy_sets,
            p["penalty"],
            batch,
            rng,
            head_features=p["tasks"],
        )
        per_task, decoder_losses = _task_means(per_task)
        return (per_task, dgr.weight * penalty), (penalty, head_stats, decoder_losses)

    (per_task, dgr_term), vjp, (penalty, head_stats, decoder_losses) = jax.vjp(
        on_features, {"heads": heads_params, "tasks": copies, "penalty": features}, has_aux=True
    )
    (grads,) = vjp((jnp.ones_like(per_task), jnp.ones_like(dgr_term)))
    task_cotangents = (
        grads["tasks"] if per_task_features else jnp.stack([grads["tasks"][name] for name in names])
    )
    return _FeatureGrads(
        per_task,
        dgr_term,
        penalty,
        decoder_losses,
        task_cotangents,
        grads["penalty"],
        grads["heads"],
        head_stats,
    )


def _per_task_cotangents(task_cotangents, features, tasks) -> list:
    """Task t's cotangent of the encoder's output, in task order: row t of the stacked
    feature gradients (Split), or MTAN's per-task features with task t's gradient and
    zeros elsewhere."""
    if not isinstance(features, Mapping):
        return list(task_cotangents)
    return [
        {s: task_cotangents[s] if s == t.name else jnp.zeros_like(features[s]) for s in features}
        for t in tasks
    ]


def _weighted_model_grads(weights, task_encoder, heads_grads, tasks) -> PyTree:
    """``sum_t w_t g_t`` of the model, differentiable in ``weights``: the encoder's rows
    contracted, each head's own gradient scaled by its task's weight."""
    return {
        "encoder": jax.tree_util.tree_map(
            lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), task_encoder
        ),
        "heads": {
            t.name: jax.tree_util.tree_map(
                lambda g, i=i: weights[i].astype(g.dtype) * g, heads_grads[t.name]
            )
            for i, t in enumerate(tasks)
        },
    }


def _per_task_head_grads(heads_grads, tasks) -> PyTree:
    """``{task: grads}`` as per-task gradients of the whole heads tree, on a leading task
    axis (zeros outside each task's own head)."""
    return {
        t.name: jax.tree_util.tree_map(
            lambda g, i=i: jnp.zeros((len(tasks),) + g.shape, g.dtype).at[i].set(g),
            heads_grads[t.name],
        )
        for i, t in enumerate(tasks)
    }


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
