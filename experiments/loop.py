"""``train_and_evaluate(config, workdir)``: the whole run behind every dataset entry point.

Data (``datasets``) -> global batches on a ``data`` mesh -> the pure, jitted
``dgr_jax.train`` step -> evaluation (``evaluation``, both metric conventions, Δm) ->
JSON lines, TensorBoard, Orbax checkpoints (latest for ``resume``, best by Δm) -> a
summary, a markdown table beside the paper's and a PNG of the curves (``reporting``).

Resume is exact: the checkpoint holds the whole train state (parameters, optimizer and
method state, RNG), the data position (epoch, step within it) and the configuration;
the input order is a function of (seed, epoch) only, so the resumed run sees the same
batches. What can go wrong ends in one line (``RunError``, ``Stopped``; README, "When
things go wrong"), never with a lost or half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dgr_jax import parallel
from dgr_jax.checkpoint import CheckpointError, Checkpoints
from dgr_jax.methods import MTLMethod
from dgr_jax.models.pretrained import encoder_from_torch, with_pretrained_encoder
from dgr_jax.train import HELDOUT, end_epoch, init_train_state, make_train_step
from experiments import reporting
from experiments.config import (
    RESUMABLE_CHANGES,
    RunConfig,
    TrainConfig,
    describe_field,
    flatten,
    record_defaults,
)
from experiments.evaluation import Evaluator
from experiments.weights import read_state_dict

RUN_FILES = (
    "checkpoints",
    "best",
    "train.jsonl",
    "eval.jsonl",
    "tensorboard",
    "summary.json",
    "results.md",
    "curves.png",
)


class RunError(RuntimeError):
    """The run cannot go on; the message is one line naming the file, flag or value."""


class Stopped(RuntimeError):
    """Stopped by a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------
# The optimiser


def learning_rate_schedule(
    train: TrainConfig, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """Cosine from ``lr`` to 0. ``lr_schedule="epoch"`` (the original's
    ``CosineAnnealingLR(T_max=epochs)``, stepped once per epoch): epoch e trains at
    ``lr (1 + cos(pi e / E)) / 2`` for all its steps; ``"step"``: the same curve per step."""
    if train.lr_schedule == "step":
        return optax.cosine_decay_schedule(train.lr, max(total_steps, 1))
    num_epochs = max(-(-total_steps // steps_per_epoch), 1)
    per_epoch = optax.cosine_decay_schedule(train.lr, num_epochs)
    return lambda count: per_epoch(count // steps_per_epoch)


def make_optimizer(
    train: TrainConfig, total_steps: int, steps_per_epoch: int, method: MTLMethod | None = None
) -> optax.GradientTransformation:
    """The paper's recipes: SGD (momentum 0.9, weight decay, cosine schedule) for scenes,
    Adam for UTKFace. Weight decay applies to the trained parameters, and to the method's
    parameters where ``method.decay_params`` (uncertainty's log-variances, as the original
    code's single SGD parameter group); the dummy sets are not in the optimised pytree."""
    decay_method = method is not None and method.decay_params

    def decayed(params):
        return {
            k: jax.tree_util.tree_map(lambda _, k=k: k != "method" or decay_method, v)
            for k, v in params.items()
        }

    decay = optax.add_decayed_weights(train.weight_decay, mask=decayed)
    if train.optimizer == "sgd":
        schedule = learning_rate_schedule(train, steps_per_epoch, total_steps)
        return optax.chain(decay, optax.sgd(schedule, momentum=0.9))
    return optax.chain(decay, optax.adam(train.lr))


def make_lookahead_optimizer(train: TrainConfig, method: MTLMethod | None = None):
    """The optimizer of a look-ahead method's virtual step: None (the training optimizer,
    momentum buffer included) for SGD; for Adam, stateless SGD at Adam's learning rate
    with the weight decay, as the original's ``virtual_step`` (it reads a momentum buffer
    from SGD only). Differentiating Adam's own first step would give zero (its update is
    ``sign(g)``) and NaN where a gradient is 0."""
    if train.optimizer == "sgd" or method is None or method.lookahead is None:
        return None
    return optax.chain(optax.add_decayed_weights(train.weight_decay), optax.sgd(train.lr))


# ---------------------------------------------------------------------------
# The work directory, resuming, signals


def prepare_workdir(workdir: str | Path, *, resume: bool, overwrite: bool, log) -> Path:
    """A writable folder for the run: refuses a file, a path under a file, an unwritable
    place, and (without ``resume`` or ``overwrite``) a folder that holds a run."""
    workdir = Path(workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"--workdir {workdir}: exists and is not a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except (NotADirectoryError, FileExistsError):
        parent = next((p for p in workdir.parents if p.exists() and not p.is_dir()), None)
        raise RunError(f"--workdir {workdir}: cannot create it, {parent} is a file") from None
    except OSError as error:
        raise RunError(
            f"--workdir {workdir}: not writable ({error.strerror or type(error).__name__})"
        ) from None
    existing = [name for name in RUN_FILES if (workdir / name).exists()]
    if existing and not resume:
        if not overwrite:
            raise RunError(
                f"--workdir {workdir} holds a run ({', '.join(existing)}); pass --resume to continue "
                "it, --overwrite to start afresh, or another --workdir"
            )
        for name in existing:
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log(f"--overwrite: removed {', '.join(existing)} from {workdir}")
    return workdir


def check_resumable(checkpoints: Checkpoints, config: RunConfig) -> None:
    """One line naming every flag whose value differs from the checkpoint's run (those
    that change the trained state or the data order), before any array is read."""
    steps = checkpoints.steps()
    if not steps:
        raise RunError(
            f"--resume: no checkpoint in {checkpoints.directory}; drop --resume to start a new run"
        )
    saved = None
    for step in reversed(steps):
        with contextlib.suppress(Exception):  # a damaged checkpoint: the restore below reports it
            saved = checkpoints.read_position(step).get("config")
            break
    if saved is None:
        return
    # A field added after the checkpoint was written had its default in that run.
    now, then = flatten(config.as_dict()), {**record_defaults(), **flatten(saved)}
    differ = [
        key
        for key in sorted(set(now) | set(then))
        if key not in RESUMABLE_CHANGES and now.get(key) != then.get(key)
    ]
    if differ:

        def show(values):
            return ", ".join(f"{describe_field(k)} {values.get(k)!r}" for k in differ)

        raise RunError(
            f"--resume: the checkpoint in {checkpoints.directory} was trained with {show(then)}; "
            f"this run has {show(now)}"
        )


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSON lines of steps up to ``step``: a resumed run writes each step once."""
    import json

    if path.exists():
        rows = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        path.write_text("".join(row + "\n" for row in rows))


class SignalGuard:
    """SIGINT / SIGTERM ask the loop to stop at the next step (it saves, then raises
    ``Stopped``); a second signal acts at once, as without the guard."""

    SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no guard
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StepLog:
    """Writes each step's metrics one step late, so the host never waits on the device,
    and stops the run at the first non-finite value."""

    def __init__(self, writers: reporting.Writers, checkpoints: Checkpoints):
        self.writers, self.checkpoints = writers, checkpoints
        self.pending = None

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self.checkpoints.wait()  # the saves in flight are of finite states: let them finish
            saved = self.checkpoints.steps()
            kept = (
                f"the last good checkpoint is step {saved[-1]}"
                if saved
                else "no checkpoint was saved"
            )
            raise FloatingPointError(
                f"step {step}: non-finite {', '.join(bad)}; stopping (lower --lr or "
                f"--dgr_weight); {kept}"
            )
        self.writers.scalars(step, values, "train")


# ---------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    """What one run is made of, built once by ``_build`` from its configuration."""

    config: RunConfig
    workdir: Path
    tasks: tuple
    data: Any
    mesh: Any
    steps_per_epoch: int
    total_steps: int
    init: Callable  # key -> TrainState (pure: its eval_shape is the state's structure)
    method: Any  # the MTLMethod
    train_step: Callable
    finish_epoch: Callable
    evaluate: Evaluator
    reference: Any
    checkpoints: Checkpoints
    writers: reporting.Writers
    log: Callable[[str], None]

    def close(self) -> None:
        self.checkpoints.close()  # waits for the saves in flight: the newest checkpoint is whole
        self.writers.close()


def train_and_evaluate(
    config: RunConfig,
    workdir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Train, evaluate every ``eval_every`` epochs, checkpoint, report; returns the summary.

    ``stop_after``: end the run early after this many steps in total (to simulate an
    interruption; the checkpoint then lets ``resume=True`` continue it).
    """
    main_process = jax.process_index() == 0
    path = config.train.pretrained
    # Read before the workdir is touched, so that a bad file leaves nothing behind.
    pretrained = load_pretrained(path, config) if path is not None and not resume else None
    created = not Path(workdir).exists()
    workdir = prepare_workdir(workdir, resume=resume, overwrite=overwrite, log=log)
    try:
        run = _build(config, workdir, log)
    except BaseException:  # bad data: a workdir made for this run is not left behind
        if created and main_process:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        state, position = _resume(run) if resume else _start(run, pretrained)
        log(_describe(run))
        with SignalGuard() as signals:
            summary = _train(run, state, position, signals, stop_after, progress and main_process)
    finally:
        run.close()
    if main_process and "metrics" in summary:
        reporting.write_summary(workdir, summary, config, run.tasks, log)
    return summary


def _build(config: RunConfig, workdir: Path, log) -> Run:
    tasks, train = config.task_records(), config.train
    mesh = parallel.make_mesh(train.num_devices)
    parallel.check_global_batch_size(train.batch_size, mesh)
    data = config.spec.open(config)
    steps_per_epoch = len(data.train_epoch(0, 0))
    if steps_per_epoch == 0:
        raise RunError(f"--batch_size {train.batch_size} is larger than the training set")
    total_steps = train.steps if train.steps is not None else train.epochs * steps_per_epoch
    net = config.build_network()
    method = config.method.build()
    optimizer = make_optimizer(train, total_steps, steps_per_epoch, method)
    sample = jnp.asarray(next(iter(data.train_epoch(0, 0)))["image"][:1])

    def init(key):
        return init_train_state(
            net, optimizer, key, sample, config.dgr.num_dummy, method, len(tasks)
        )

    reference = config.reference if config.reference is not None else config.spec.paper_reference
    if config.reference is None and reference and config.data.synthetic:
        log(
            "note: Δm is against the paper's single-task results on the real data set; on built-in data "
            "pass --reference with your own single-task runs' summary.json for a meaningful Δm"
        )
    if not reference and len(tasks) > 1:
        log(
            f"note: no single-task reference for {config.spec.name}, so no Δm: pass --reference "
            "with the summary.json files of single-task runs (--tasks <one task>)"
        )
    replicated = parallel.replicated(mesh)
    return Run(
        config=config,
        workdir=workdir,
        tasks=tasks,
        data=data,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        init=init,
        method=method,
        train_step=parallel.jit_train_step(
            make_train_step(
                net,
                tasks,
                config.dgr,
                optimizer,
                method,
                lookahead_optimizer=make_lookahead_optimizer(train, method),
                regularizer=config.regularizer.build(),
            ),
            mesh,
        ),
        finish_epoch=jax.jit(lambda s: end_epoch(method, s), out_shardings=replicated),
        evaluate=Evaluator(net, tasks, reference),
        reference=reference,
        checkpoints=Checkpoints(workdir),
        writers=reporting.Writers(workdir, jax.process_index() == 0),
        log=log,
    )


def _start(run: Run, pretrained=None):
    """A fresh state; with ``pretrained`` (``load_pretrained``), its encoder trunk."""
    key = jax.random.PRNGKey(run.config.train.seed)
    replicated = parallel.replicated(run.mesh)
    state = jax.jit(run.init, out_shardings=replicated)(key)
    if pretrained is not None:
        run.log(f"encoder trunk from {run.config.train.pretrained} ({run.config.model.backbone})")
        merged = with_pretrained_encoder(
            {"params": state.params, "batch_stats": state.batch_stats}, pretrained
        )
        state = jax.device_put(
            state.replace(params=merged["params"], batch_stats=merged["batch_stats"]), replicated
        )
    return state, {"epoch": 0, "step_in_epoch": 0}


def load_pretrained(path: str, config: RunConfig) -> dict:
    """The encoder's variables from a pretrained checkpoint (a new run's start; a resumed
    run has them in its checkpoint); any problem with the file is one ``RunError`` line."""
    try:
        return encoder_from_torch(read_state_dict(path), config.model)
    except ValueError as error:  # WeightsError, or the mapping's key / shape message
        message = str(error)
        if not message.startswith("--pretrained"):
            message = f"--pretrained {path}: {message.removeprefix('pretrained weights: ')}"
        raise RunError(message) from None


def _resume(run: Run):
    """The newest good checkpoint, restored into the abstract state, after checking that
    the saved configuration is this one; the logs lose the rows after it."""
    check_resumable(run.checkpoints, run.config)
    key = jax.random.PRNGKey(run.config.train.seed)
    replicated = parallel.replicated(run.mesh)
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        jax.eval_shape(run.init, key),
    )
    try:
        state, position, _ = run.checkpoints.restore_newest(abstract, run.log)
    except CheckpointError as error:
        raise RunError(f"--resume: {error}") from None
    step = int(state.step)
    if jax.process_index() == 0:
        for kind in ("train", "eval"):
            drop_rows_after(run.workdir / f"{kind}.jsonl", step)
    run.log(
        f"resumed from step {step} (epoch {position['epoch']}, step {position['step_in_epoch']} in it)"
    )
    return state, position


def _describe(run: Run) -> str:
    config, dgr = run.config, run.config.dgr
    return (
        f"{config.dataset}: {config.model.network} {config.model.backbone}, tasks "
        f"{', '.join(t.name for t in run.tasks)}, weighting {config.method.name}, "
        f"DGR {f'λ={dgr.weight} ({dgr.estimator}, K={dgr.num_dummy})' if dgr.on else 'off'}"
        f"{_describe_regularizer(config.regularizer)}; "
        f"{run.data.description}; {run.steps_per_epoch} steps/epoch, {run.total_steps} steps on "
        f"{run.mesh.shape['data']} device(s)"
    )


def _describe_regularizer(regularizer) -> str:
    fields = ", ".join(f"{name}={getattr(regularizer, name)}" for name in regularizer.spec.fields)
    return f", regularizer {regularizer.name}" + (f" ({fields})" if fields else "")


def _batches(run: Run, epoch: int, start: int):
    """The epoch's training batches from ``start``; for a method that looks ahead, each
    with the held-out pass's batch under ``heldout/`` keys (a short last batch meets a
    short one: both passes are over the same set)."""
    train = run.data.train_epoch(epoch, start)
    if run.method.lookahead is None:
        yield from train
        return
    for batch, heldout in zip(train, run.data.heldout_epoch(epoch, start)):
        yield {**batch, **{HELDOUT + k: v for k, v in heldout.items()}}


def _train(run: Run, state, position, signals: SignalGuard, stop_after, progress) -> dict:
    """The loop: steps, epoch ends (method update, checkpoint, evaluation), signals."""
    config, checkpoints = run.config, run.checkpoints
    step = int(state.step)
    epoch, start = position["epoch"], position["step_in_epoch"]
    steps_log = StepLog(run.writers, checkpoints)
    history, last = [], None
    bar = reporting.progress_bar(run.total_steps, step, progress)
    config_json = config.as_dict()
    names = {"image"} | {t.name for t in run.tasks}
    names |= {HELDOUT + name for name in names}

    def save(at_epoch, at_step):
        steps_log.flush()  # never save a state whose step was not finite
        checkpoints.save(
            step, state, {"epoch": at_epoch, "step_in_epoch": at_step, "config": config_json}
        )

    def evaluate():
        metrics, paper = run.evaluate(state, run.data.evaluation())
        row = {"epoch": epoch, **metrics, **{f"paper/{k}": v for k, v in paper.items()}}
        run.writers.scalars(step, row, "eval")
        return metrics, paper, row

    try:
        while step < run.total_steps:
            for batch in _batches(run, epoch, start):
                batch = {k: v for k, v in batch.items() if k in names}
                state, metrics = run.train_step(state, parallel.global_batch(batch, run.mesh))
                step, start = step + 1, start + 1
                steps_log.push(step, metrics)
                bar.update(1)
                if signals.received is not None:
                    save(epoch, start)
                    checkpoints.wait()
                    raise Stopped(
                        f"stopped by {SignalGuard.SIGNALS[signals.received]} at step {step}; "
                        "checkpoint saved; rerun with --resume",
                        128 + int(signals.received),
                    )
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
                    save(epoch, start)
                if step >= run.total_steps or (stop_after is not None and step >= stop_after):
                    break
            steps_log.flush()
            epoch_done = start >= run.steps_per_epoch
            if epoch_done:
                state = run.finish_epoch(state)
                epoch, start = epoch + 1, 0
            save(epoch, start)
            if epoch_done and (epoch % config.train.eval_every == 0 or step >= run.total_steps):
                last = evaluate()
                metrics, paper, row = last
                if math.isfinite(metrics.get("delta_m", math.nan)):
                    checkpoints.save_best(
                        step, state, {"epoch": epoch, "step_in_epoch": 0}, metrics
                    )
                history.append({"step": step, **row})
                bar.write(
                    f"epoch {epoch} step {step}: "
                    + reporting.format_metrics(metrics, paper, run.tasks)
                )
            if stop_after is not None and stop_after <= step < run.total_steps:
                run.log(f"stopped after step {step}; resume with --resume")
                return {"stopped_at": step}
    finally:
        bar.close()
    metrics, paper, _ = last if last is not None else evaluate()
    return {
        "config": config_json,
        "steps": step,
        "metrics": metrics,
        "metrics_paper": paper,
        "conventions": reporting.METRIC_CONVENTIONS,
        "reference": run.reference,
        "history": history,
    }
