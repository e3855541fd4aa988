"""Data parallelism in the global view: one ``Mesh`` axis ``data``, the batch sharded on
it, the train state replicated.

Under ``jax.jit`` with these shardings every reduction over the batch is global:
BatchNorm statistics are those of the whole global batch (synced BN), losses and
gradients are means over it, so a step gives the same numbers on 1 or N devices.
Multi-host: call ``initialize_distributed()`` first; each process then feeds its own
slice of the global batch (``data_pipelines`` shard by ``jax.process_index()``) and
``global_batch`` assembles the global arrays.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
PyTree = Any


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` where a multi-process launch is configured
    (coordinator address in the environment, or a cluster JAX detects); no-op otherwise."""
    if jax.process_count() > 1:
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1" \
            or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"make_mesh: asked for {count} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.shape[DATA_AXIS]
    if global_batch_size % devices:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {devices} devices "
                         f"of the '{DATA_AXIS}' mesh axis")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (batch axis sharded on ``data``) from this process's slice.

    A batch whose size the devices do not divide (a short last batch, single process) is
    replicated instead: the jitted step computes the same global-view numbers either way
    (BatchNorm statistics and losses over the whole batch), it only runs unsplit."""
    sizes = {np.shape(value)[0] for value in local_batch.values()}
    devices = mesh.shape[DATA_AXIS]
    if jax.process_count() == 1 and any(size % devices for size in sizes):
        return replicate({key: np.asarray(value) for key, value in local_batch.items()}, mesh)
    sharding = batch_sharded(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    return jax.device_put(tree, replicated(mesh))


def jit_train_step(step: Callable, mesh: Mesh) -> Callable:
    """``jax.jit`` of ``step(state, batch) -> (state, metrics)``: state replicated and
    donated, metrics replicated. The inputs keep the shardings they come with: the state
    replicated (as this step returns it), the batch from ``global_batch`` (sharded on
    ``data``, or replicated when the devices do not divide it)."""
    return jax.jit(step, out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
