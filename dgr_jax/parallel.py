"""Data parallelism in the global view: one ``Mesh`` axis ``data``, the batch sharded on
it, the train state replicated.

Under ``jax.jit`` with these shardings every reduction over the batch is global:
BatchNorm statistics are those of the whole global batch (synced BN), losses and
gradients are means over it, so a step gives the same numbers on 1 or N devices.
Multi-host: call ``initialize_distributed()`` first; each process then feeds its own
slice of the global batch (``data_pipelines`` shard by ``jax.process_index()``) and
``global_batch`` assembles the global arrays. Evaluation runs on each process's devices
over its shard of the evaluation set; ``sum_over_processes`` merges the statistics.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
PyTree = Any


def multi_process_launch(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a multi-process launch that
    ``jax.distributed.initialize()`` can join: a coordinator address (JAX's own
    variables), a SLURM job of several tasks, or a Cloud TPU slice of several hosts."""
    environ = os.environ if environ is None else environ
    return (
        bool(environ.get("JAX_COORDINATOR_ADDRESS"))
        or environ.get("SLURM_NTASKS", "1") != "1"
        or "," in environ.get("TPU_WORKER_HOSTNAMES", "")
    )


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` where a multi-process launch is configured; a no-op
    otherwise. Call it first: it must run before any other JAX call (even
    ``jax.process_count()``), so it reads only the environment. Returns whether it
    initialised."""
    if not multi_process_launch():
        return False
    jax.distributed.initialize()
    return True


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
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {devices} devices "
            f"of the '{DATA_AXIS}' mesh axis"
        )


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
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    return jax.device_put(tree, replicated(mesh))


def local_mesh() -> Mesh:
    """A 1-D ``data`` mesh over this process's devices (evaluation runs per process)."""
    return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def local_copy(tree: PyTree, mesh: Mesh) -> PyTree:
    """A replicated global array's local value, replicated on this process's ``mesh``."""
    return replicate(jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree), mesh)


def sum_over_processes(tree: PyTree) -> PyTree:
    """The sum of every process's ``tree`` (statistics of disjoint shards), on the host;
    the tree itself with one process."""
    tree = jax.device_get(tree)
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(tree)
    return jax.tree_util.tree_map(lambda a: np.sum(a, axis=0), gathered)


def jit_train_step(step: Callable, mesh: Mesh) -> Callable:
    """``jax.jit`` of ``step(state, batch) -> (state, metrics)``: state replicated and
    donated, metrics replicated. The inputs keep the shardings they come with: the state
    replicated (as this step returns it), the batch from ``global_batch`` (sharded on
    ``data``, or replicated when the devices do not divide it)."""
    return jax.jit(step, out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
