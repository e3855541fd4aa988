"""Train state and the pure train step: ``step(state, batch) -> (state, metrics)``.

The step differentiates ``objective.multitask_loss`` once with respect to the encoder
and task-head parameters; the dummy sets live in the state but are never
differentiated, updated or decayed. With ``dgr.method == "paper"`` the original
finite-difference algorithm supplies the encoder's DGR gradient instead, added after
the task gradients (as the original code does).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dgr_jax.models import MultiTaskNet
from dgr_jax.objective import DGRConfig, multitask_loss, paper_dgr_encoder_grads
from dgr_jax.penalty import init_dummy_sets
from dgr_jax.tasks import Task

PyTree = Any


@flax.struct.dataclass
class TrainState:
    params: PyTree  # {"encoder": ..., "heads": ...}: what the optimizer updates
    batch_stats: PyTree
    dummy_sets: PyTree  # K stacked head sets, fixed for the whole run
    opt_state: PyTree
    step: jax.Array
    rng: jax.Array


def init_train_state(net: MultiTaskNet, optimizer: optax.GradientTransformation, key: jax.Array,
                     sample_images: jax.Array, num_dummy: int) -> TrainState:
    """Initialise model, K dummy sets (independent keys) and optimizer state."""
    key_model, key_dummy, key_rng = jax.random.split(key, 3)
    variables = net.init(key_model, sample_images, train=False)
    features, _ = net.apply(variables, sample_images, train=False)
    dummy_sets = init_dummy_sets(net.heads, key_dummy, num_dummy, features,
                                 sample_images.shape[1:3], train=False)
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        dummy_sets=dummy_sets,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=key_rng,
    )


def make_train_step(net: MultiTaskNet, tasks: Sequence[Task], dgr: DGRConfig,
                    optimizer: optax.GradientTransformation):
    """A pure ``step(state, batch) -> (state, metrics)``; jit it with the state donated."""

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng, dropout_rng = jax.random.split(state.rng)

        def loss(params):
            return multitask_loss(net, tasks, dgr, params, state.batch_stats, state.dummy_sets,
                                  batch, dropout_rng)

        (total, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        metrics = {f"loss/{t.name}": aux["task_losses"][i] for i, t in enumerate(tasks)}
        metrics["loss/total"] = total
        metrics["dgr/penalty"] = aux["penalty"]
        if dgr.method == "paper" and dgr.weight > 0:
            extra = paper_dgr_encoder_grads(net, tasks, dgr, state.params, state.batch_stats,
                                            state.dummy_sets, batch)
            metrics["grad_norm/dgr_encoder"] = optax.tree.norm(extra)
            grads = {**grads, "encoder": jax.tree_util.tree_map(jnp.add, grads["encoder"], extra)}
        metrics["grad_norm/encoder"] = optax.tree.norm(grads["encoder"])
        metrics["grad_norm/heads"] = optax.tree.norm(grads["heads"])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates),
            batch_stats=aux["batch_stats"],
            opt_state=opt_state,
            step=state.step + 1,
            rng=rng,
        )
        return new_state, metrics

    return step
