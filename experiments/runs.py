"""Runs that analysis commands train, skip, resume and read back.

The ablation, universality, probes and table commands all work on ordinary training
runs (``experiments.loop.train_and_evaluate``, as ``python -m experiments.nyuv2``), one
workdir each: ``train_or_skip`` starts one, skips it when it finished before and resumes
it when it was interrupted; ``RunSetup`` rebuilds a run's network, first batch and
initial state from its ``RunConfig`` and reads its checkpoints back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def say(text: str) -> None:
    print(text, flush=True)


def checkpoint_steps(workdir: Path) -> list[int]:
    """The steps of the checkpoints kept in ``workdir`` (oldest first)."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def finished_summary(workdir: Path, total_steps: int | None = None) -> dict | None:
    """The summary of a run that finished in ``workdir`` (all ``total_steps`` when given),
    else None."""
    path = Path(workdir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if "metrics" not in summary:
        return None
    if total_steps is not None and summary.get("steps") != total_steps:
        return None
    return summary


def train_or_skip(
    config,
    workdir: Path,
    label: str,
    *,
    total_steps: int | None = None,
    stop_after: int | None = None,
    prog: str = "experiments",
    log: Callable[[str], None] = say,
) -> dict | None:
    """The run of ``config`` in ``workdir`` up to ``stop_after`` (None: to the end):
    skipped when it finished before, resumed when interrupted, started otherwise.
    Returns its summary (None when it stopped early). A run's error is one line,
    ``prog: label: message``, as ``SystemExit``."""
    from experiments.loop import RunError, train_and_evaluate

    workdir = Path(workdir)
    summary = finished_summary(workdir, total_steps)
    if summary is not None:
        log(f"{label}: done before, skipped")
        return summary
    saved = checkpoint_steps(workdir)
    if stop_after is not None and saved and saved[-1] >= stop_after:
        return None
    resume = bool(saved)
    until = f" to step {stop_after}" if stop_after is not None else ""
    how = f"resuming from step {saved[-1]}" if resume else "starting"
    of = f" of {total_steps}" if total_steps is not None else ""
    log(f"{label}: {how}{until}{of}")
    start = time.perf_counter()
    try:
        summary = train_and_evaluate(
            config,
            workdir,
            resume=resume,
            overwrite=not resume,
            stop_after=stop_after,
            progress=False,
            log=lambda text: log(f"  {text}"),
        )
    except (RunError, ValueError, FloatingPointError) as error:
        raise SystemExit(f"{prog}: {label}: {' '.join(str(error).split())}") from None
    log(f"{label}: {time.perf_counter() - start:.0f} s")
    return summary if "metrics" in summary else None


class RunSetup:
    """A run's network, data, first training batch and initial state, rebuilt from its
    ``RunConfig`` exactly as the run loop builds them (same seed: same initialisation),
    and its checkpoints read back."""

    def __init__(self, config, prog: str = "experiments"):
        import jax
        import jax.numpy as jnp

        from dgr_jax import parallel
        from dgr_jax.models import build_model
        from dgr_jax.train import init_train_state
        from experiments.loop import make_optimizer

        self.config = config
        self.tasks = config.task_records()
        self.net = build_model(config.model, self.tasks)
        self.data = config.spec.open(config, verbose=False)
        self.data_description = self.data.description
        first_epoch = self.data.train_epoch(0, 0)
        self.steps_per_epoch = len(first_epoch)
        if self.steps_per_epoch == 0:
            raise SystemExit(
                f"{prog}: --batch_size {config.train.batch_size} is larger than the training set"
            )
        self.total_steps = config.train.epochs * self.steps_per_epoch
        names = {"image"} | {t.name for t in self.tasks}
        self.batch = {k: v for k, v in next(iter(first_epoch)).items() if k in names}
        self.image_size = tuple(self.batch["image"].shape[1:3])
        sample = jnp.asarray(self.batch["image"][:1])
        method = config.method.build()
        optimizer = make_optimizer(config.train, self.total_steps, self.steps_per_epoch, method)

        def init(key):  # the run's own initialisation (experiments.loop._build)
            return init_train_state(
                self.net, optimizer, key, sample, config.dgr.num_dummy, method, len(self.tasks)
            )

        self.init = init
        self.key = jax.random.PRNGKey(config.train.seed)
        self.replicated = parallel.replicated(parallel.make_mesh(config.train.num_devices))

    def initial_state(self):
        import jax

        return jax.jit(self.init, out_shardings=self.replicated)(self.key)

    def restore(self, workdir: Path, step: int | None = None):
        """The state of checkpoint ``step`` (None: the newest) of the run in ``workdir``;
        None when it is not kept."""
        import jax

        from dgr_jax.checkpoint import Checkpoints

        abstract = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
            jax.eval_shape(self.init, self.key),
        )
        with Checkpoints(workdir) as checkpoints:
            steps = checkpoints.steps()
            step = steps[-1] if step is None and steps else step
            if step not in steps:
                return None
            state, _ = checkpoints.restore(abstract, step)
        return state


def use_compilation_cache(root: Path) -> None:
    """JAX's persistent compilation cache in ``root/xla_cache``, unless one is set: runs
    that share a program (segments of one run, reruns of a command) compile it once."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str((Path(root) / "xla_cache").absolute()))
