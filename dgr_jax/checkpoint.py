"""Orbax checkpoints of a train state: the latest few for resuming, the best by a metric.

``workdir/checkpoints/<step>`` holds the state and a small JSON of run position
(epoch, step within the epoch, the run's configuration, ...) for exact resume;
``workdir/best/<step>`` the state with the best evaluation metric (Δm by default, higher
is better). Saves are asynchronous: a step only waits for the device-to-host copy, and
``close()`` (or the context manager) waits for the writes before the program exits.

A save of a step that is already saved is a no-op. Orbax only ever publishes a finished
save under its final name, so an interrupted one is never mistaken for a checkpoint;
once a save has finished, ``<step>.files.json`` beside it records the size of every file
in it. ``restore_newest`` restores the newest checkpoint whose files still match that
record (and that reads back), skipping and reporting damaged ones, e.g. one truncated by
a crash or a full disk, and moves those aside (``<step>.unreadable``) so the resumed run
can save its own. Damaged files are found before Orbax reads them: its failed reads
leave background work that prints tracebacks long after the error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message is one line naming the folder."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


class Checkpoints:
    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int = 2,
        best_metric: str = "delta_m",
        best_mode: str = "max",
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpoints: best_mode must be 'max' or 'min', got {best_mode!r}")
        workdir = Path(workdir).expanduser().absolute()
        self.directory = workdir / "checkpoints"
        self.best_metric, self.best_mode = best_metric, best_mode
        self._latest = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "position"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )
        self._best = ocp.CheckpointManager(
            workdir / "best",
            item_names=("state", "position"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode=best_mode,
            ),
        )

    @staticmethod
    def _args(state, position):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(dict(position))
        )

    def save(self, step: int, state: PyTree, position: Mapping[str, Any]) -> bool:
        """Checkpoint for resuming; ``position`` (JSON-able) says where the data stood.
        Returns False (and writes nothing) when ``step`` is already saved."""
        if step in self._latest.all_steps(read=True):
            return False
        self._record_finished()
        self._latest.save(step, args=self._args(state, position), force=True)
        return True

    # -- file records of finished saves

    def _record_path(self, step: int) -> Path:
        return self.directory / f"{step}.files.json"

    def _files(self, step: int) -> dict[str, int]:
        root = self.directory / str(step)
        return {
            str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    def _record_finished(self) -> None:
        """Write the file record of every finished save that has none (the previous save is
        finished when the next one starts; ``wait`` and ``close`` finish the last)."""
        if self._latest.is_saving_in_progress():
            return
        steps = self._latest.all_steps(read=True)
        for record in self.directory.glob("*.files.json"):  # of steps max_to_keep removed
            name = record.name.removesuffix(".files.json")
            if name.isdigit() and int(name) not in steps:
                record.unlink(missing_ok=True)
        for step in steps:
            record = self._record_path(step)
            if not record.exists():
                tmp = record.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._files(step)))
                tmp.replace(record)

    def damage(self, step: int) -> str | None:
        """Why checkpoint ``step``'s files no longer match their record (None: they match,
        or there is no record yet)."""
        record = self._record_path(step)
        if not record.exists():
            return None
        try:
            expected = json.loads(record.read_text())
        except (OSError, ValueError):
            return f"its file record {record} is unreadable"
        found = self._files(step)
        for name, size in expected.items():
            if name not in found:
                return f"{name} is missing"
            if found[name] != size:
                return f"{name} has {found[name]} bytes, {size} were written"
        return None

    def best_value(self) -> float | None:
        """The metric of the kept best state (None before the first)."""
        step = self._best.latest_step()  # max_to_keep=1: the only one
        if step is None:
            return None
        position = self._best.restore(
            step, args=ocp.args.Composite(position=ocp.args.JsonRestore())
        )["position"]
        return float(position["_best_value"])

    def save_best(
        self, step: int, state: PyTree, position: Mapping[str, Any], metrics: Mapping[str, float]
    ) -> bool:
        """Keep ``state`` if ``metrics[best_metric]`` beats the kept one; returns whether it did.
        A NaN metric never becomes the best; a step kept already stays as it is."""
        value = float(metrics[self.best_metric])
        if value != value or step in self._best.all_steps(read=True):
            return False
        old = self.best_value()
        if old is not None and not (value > old if self.best_mode == "max" else value < old):
            return False
        self._best.wait_until_finished()
        self._best.save(
            step,
            args=self._args(state, {**position, "_best_value": value}),
            metrics={self.best_metric: value},
            force=True,
        )
        return True

    def steps(self) -> list[int]:
        """Steps of the finished checkpoints for resuming, oldest first."""
        return sorted(self._latest.all_steps(read=True))

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def read_position(self, step: int) -> dict:
        """The position JSON of checkpoint ``step`` (cheap: no arrays are read)."""
        return dict(
            self._latest.restore(step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))[
                "position"
            ]
        )

    def restore(self, abstract_state: PyTree, step: int | None = None, *, best: bool = False):
        """``(state, position)`` from the latest (or ``step``, or the best) checkpoint.
        ``abstract_state``: ``jax.ShapeDtypeStruct`` leaves with the target shardings."""
        manager = self._best if best else self._latest
        step = (manager.best_step() if best else manager.latest_step()) if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {manager.directory}")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), position=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["position"]

    def restore_newest(self, abstract_state: PyTree, log: Callable[[str], None] = print):
        """``(state, position, step)`` of the newest checkpoint that reads back, saying which
        ones it skipped. Raises ``CheckpointError`` when there is none."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        unreadable = []
        for step in reversed(steps):
            damage = self.damage(step)
            if damage is None:
                try:
                    state, position = self.restore(abstract_state, step)
                except Exception as error:  # Orbax / TensorStore raise many kinds for damaged files
                    damage = _one_line(error)
            if damage is not None:
                log(
                    f"checkpoint {self.directory / str(step)} is unreadable ({damage}); trying the one before"
                )
                unreadable.append(step)
                continue
            for bad in unreadable:  # kept for inspection, out of the way of the resumed run's saves
                (self.directory / str(bad)).rename(self.directory / f"{bad}.unreadable")
                if self._record_path(bad).exists():
                    self._record_path(bad).rename(self.directory / f"{bad}.unreadable.files.json")
            if unreadable:
                self._latest.reload()
                log(
                    f"moved the unreadable checkpoint(s) aside: "
                    f"{', '.join(str(self.directory / f'{bad}.unreadable') for bad in unreadable)}"
                )
            return state, position, step
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps})")

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()
        self._record_finished()

    def close(self) -> None:
        """Finish pending saves, record them, and release the managers."""
        try:
            self.wait()
        finally:
            self._latest.close()
            self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def abstract_like(state: PyTree) -> PyTree:
    """Shape/dtype/sharding skeleton of ``state`` for ``Checkpoints.restore``."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
