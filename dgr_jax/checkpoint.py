"""Orbax checkpoints of a train state: the latest few for resuming, the best by a metric.

``workdir/checkpoints/<step>`` holds the state and a small JSON of run position
(epoch, step within the epoch, ...) for exact resume; ``workdir/best/<step>`` the state
with the best evaluation metric (Δm by default, higher is better). Saves are
asynchronous: a step only waits for the device-to-host copy, and ``close()`` (or the
context manager) waits for the writes before the program exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpoints:
    def __init__(self, workdir: str | Path, *, max_to_keep: int = 2, best_metric: str = "delta_m",
                 best_mode: str = "max"):
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpoints: best_mode must be 'max' or 'min', got {best_mode!r}")
        workdir = Path(workdir).expanduser().absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        self._latest = ocp.CheckpointManager(
            workdir / "checkpoints", item_names=("state", "position"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
        self._best = ocp.CheckpointManager(
            workdir / "best", item_names=("state", "position"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode))

    @staticmethod
    def _args(state, position):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(dict(position)))

    def save(self, step: int, state: PyTree, position: Mapping[str, Any]) -> None:
        """Checkpoint for resuming; ``position`` (JSON-able) says where the data stood."""
        self._latest.save(step, args=self._args(state, position), force=True)

    def best_value(self) -> float | None:
        """The metric of the kept best state (None before the first)."""
        step = self._best.latest_step()  # max_to_keep=1: the only one
        if step is None:
            return None
        position = self._best.restore(step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))["position"]
        return float(position["_best_value"])

    def save_best(self, step: int, state: PyTree, position: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
        """Keep ``state`` if ``metrics[best_metric]`` beats the kept one; returns whether it did."""
        value = float(metrics[self.best_metric])
        old = self.best_value()
        if old is not None and not (value > old if self.best_mode == "max" else value < old):
            return False
        self._best.wait_until_finished()
        self._best.save(step, args=self._args(state, {**position, "_best_value": value}),
                        metrics={self.best_metric: value}, force=True)
        return True

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def restore(self, abstract_state: PyTree, step: int | None = None, *, best: bool = False):
        """``(state, position)`` from the latest (or ``step``, or the best) checkpoint.
        ``abstract_state``: ``jax.ShapeDtypeStruct`` leaves with the target shardings."""
        manager = self._best if best else self._latest
        step = (manager.best_step() if best else manager.latest_step()) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), position=ocp.args.JsonRestore()))
        return restored["state"], restored["position"]

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def abstract_like(state: PyTree) -> PyTree:
    """Shape/dtype/sharding skeleton of ``state`` for ``Checkpoints.restore``."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
