"""Runs that analysis commands train, skip, resume and read back.

The ablation, universality, probes and table commands all work on ordinary training
runs (``experiments.loop.train_and_evaluate``, as ``python -m experiments.nyuv2``), one
workdir each: ``train_or_skip`` starts one, skips it when it finished before and resumes
it when it was interrupted; ``RunSetup`` rebuilds a run's network, first batch and
initial state from its ``RunConfig`` and reads its checkpoints back. Sweeps (the table
commands) describe each run as a ``Cell`` (flags of its entry point and a workdir) and
train them one after another with ``run_cells``, each also printed as a shell command.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Callable, NoReturn, Sequence


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
        differ = config_differences(summary.get("config"), config)
        if differ:
            raise SystemExit(
                f"{prog}: {label}: {workdir} holds a finished run with {'; '.join(differ)}; "
                "remove it or use another --workdir"
            )
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
    if not resume:  # a fresh start: earlier sessions' times are of another run
        (workdir / WALL_TIME_FILE).unlink(missing_ok=True)
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
    seconds = time.perf_counter() - start
    record_wall_time(
        workdir,
        saved[-1] if resume else 0,
        summary.get("steps", summary.get("stopped_at")),
        seconds,
    )
    log(f"{label}: {seconds:.0f} s")
    return summary if "metrics" in summary else None


# Fields a finished run may differ in from the one asked for and still be that run: they
# change neither its trained state nor its final metrics (Δm's reference is applied anew
# by whoever reads the metrics).
FINISHED_RUN_CHANGES = (
    "train.checkpoint_every",
    "train.eval_every",
    "train.num_devices",
    "data.data_dir",
    "reference",
)


def config_differences(saved: dict | None, config) -> list[str]:
    """``"--flag saved (asked for new)"`` for every field in which a finished run's saved
    configuration differs from ``config`` (beyond ``FINISHED_RUN_CHANGES``): reusing it
    would put another run's numbers in a table. A field the saved run predates counts as
    its default."""
    from experiments.config import describe_field, flatten

    if saved is None:
        return []
    now = flatten(config.as_dict())
    then = {**flatten(type(config)().as_dict()), **flatten(saved)}
    return [
        f"{describe_field(key)} {then.get(key)!r} (asked for {now.get(key)!r})"
        for key in sorted(set(now) | set(then))
        if key not in FINISHED_RUN_CHANGES and now.get(key) != then.get(key)
    ]


WALL_TIME_FILE = "wall_time.jsonl"  # one line per training session of a run


def record_wall_time(workdir: Path, from_step: int, to_step: int | None, seconds: float) -> None:
    """Append a session's wall time to the run's ``wall_time.jsonl`` (``train_or_skip``
    removes it at a fresh start): what sweeps estimate the cost of runs still to go from."""
    if to_step is None or to_step <= from_step:
        return
    with open(Path(workdir) / WALL_TIME_FILE, "a") as f:
        row = {"from_step": from_step, "to_step": to_step, "seconds": round(seconds, 3)}
        f.write(json.dumps(row) + "\n")


def seconds_per_step(workdir: Path) -> float | None:
    """Wall seconds per trained step over the recorded sessions of the run in
    ``workdir`` (compilation, evaluation and checkpoints included); None if none."""
    path = Path(workdir) / WALL_TIME_FILE
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = sum(r["to_step"] - r["from_step"] for r in rows)
    return sum(r["seconds"] for r in rows) / steps if steps > 0 else None


# ---------------------------------------------------------------------------
# Sweeps: many ordinary runs, one after another, each also a command of its own

# A CPU preset for sweeps on built-in data: tiny networks and data, a few epochs.
TINY_PRESET = (
    "--base_width", "4", "--head_width", "8", "--stage_sizes", "1,1,1,1",
    "--synthetic_size", "24x32", "--synthetic_counts", "8,4", "--epochs", "2",
    "--batch_size", "4",
)  # fmt: skip


def refuse_flags(
    fail: Callable[[str], NoReturn], passed: Sequence[str], blocked, owner: str
) -> None:
    """A sweep passes the flags it does not know to every run; those in ``blocked`` it
    sets itself, so one given is an error: ``fail("--seed is set by <owner> itself for
    each run (use --seeds)")``. ``blocked``: flags, or ``{flag: the sweep's own flag for
    it, or None}``."""
    instead = blocked if isinstance(blocked, dict) else dict.fromkeys(blocked)
    given = sorted(set(instead) & {a.split("=")[0] for a in passed})
    if given:
        use = instead[given[0]]
        fail(f"{given[0]} is set by {owner} itself for each run" + (f" (use {use})" if use else ""))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``python -m experiments.<dataset> <flags>`` in ``workdir``."""

    label: str
    dataset: str
    flags: tuple[str, ...]
    workdir: Path

    def command(self) -> str:
        """The run as a shell command (``--resume`` when it was interrupted), for a
        scheduler that runs the cells in parallel."""
        resume = ["--resume"] if self.state()[0] == "partial" else []
        argv = [*self.flags, "--workdir", str(self.workdir), "--no_progress", *resume]
        return shlex.join(["python", "-m", f"experiments.{self.dataset}", *argv])

    def state(self) -> tuple[str, int | None]:
        """``("done", steps)``, ``("partial", newest checkpoint's step)`` or
        ``("to run", None)``."""
        summary = finished_summary(self.workdir)
        if summary is not None:
            return "done", summary.get("steps")
        saved = checkpoint_steps(self.workdir)
        return ("partial", saved[-1]) if saved else ("to run", None)


def cell_configs(cells: Sequence[Cell], fail: Callable[[str], NoReturn]) -> list:
    """Every cell's ``RunConfig``, built by the entry point's own parser and
    ``cli.build_config`` before anything trains; a bad flag or value is one line through
    ``fail`` (the sweep's ``parser.error``)."""
    from experiments import cli
    from experiments.datasets import DATASETS

    parsers, configs = {}, []
    for cell in cells:
        spec = DATASETS[cell.dataset]
        if cell.dataset not in parsers:
            parser = parsers[cell.dataset] = cli.make_parser(spec)
            parser.error = fail  # the entry point's parse errors as the sweep's one line
        args, unknown = parsers[cell.dataset].parse_known_args(list(cell.flags))
        if unknown:
            fail(f"unrecognized arguments: {' '.join(unknown)}")
        try:
            configs.append(cli.build_config(spec, args))
        except SystemExit as error:
            if isinstance(error.code, str):  # build_config's one line, "experiments.x: ..."
                fail(error.code.split(": ", 1)[-1])
            raise
    return configs


def write_commands(path: Path, cells: Sequence[Cell]) -> None:
    """Every cell's command, one a line, those of finished runs commented out."""
    lines = [f"# {len(cells)} runs; each line is one of them, in any order or in parallel"]
    for cell in cells:
        lines.append(("# done: " if cell.state()[0] == "done" else "") + cell.command())
    Path(path).write_text("\n".join(lines) + "\n")


def run_cells(
    cells: Sequence[Cell], configs: Sequence, prog: str, log: Callable[[str], None] = say
) -> list[dict]:
    """Train every cell one after another (``train_or_skip``: finished runs skipped,
    interrupted ones resumed), each announced with its flags and its command line; the
    summaries in order."""
    summaries = []
    for number, (cell, config) in enumerate(zip(cells, configs), 1):
        label = f"[{number}/{len(cells)}] {cell.label}"
        if cell.state()[0] != "done":
            log(f"{label}: {' '.join(cell.flags)}")
            log(f"  as a command: {cell.command()}")
        summary = train_or_skip(config, cell.workdir, label, prog=prog, log=log)
        if summary is None:
            raise SystemExit(f"{prog}: {label}: the run stopped before its end")
        summaries.append(summary)
    return summaries


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


# ---------------------------------------------------------------------------
# Finished runs side by side (the universality and probe analyses)


class FinishedRun:
    """A finished run read back from its workdir alone: its ``RunConfig`` (from
    ``summary.json["config"]``, ``RunConfig.from_dict``), its ``RunSetup`` and the state
    of its newest checkpoint (the end of training). ``label``: the workdir's folder name
    unless given."""

    def __init__(self, workdir: Path, label: str | None = None, prog: str = "experiments"):
        from dgr_jax.errors import ConfigError
        from experiments.config import RunConfig

        self.workdir = Path(workdir)
        self.label = label or self.workdir.resolve().name
        summary = finished_summary(self.workdir)
        if summary is None or "config" not in summary:
            raise SystemExit(
                f"{prog}: {self.workdir}: not a finished run (no summary.json with its "
                "metrics and config; train it to the end first)"
            )
        self.summary = summary
        try:
            self.config = RunConfig.from_dict(summary["config"])
        except (ConfigError, ValueError, TypeError) as error:
            raise SystemExit(
                f"{prog}: {self.workdir}: unreadable run configuration ({error})"
            ) from None
        from data_pipelines.common import DataError

        try:  # its data as the run read it: the folder of its --data_dir, or built in
            self.setup = RunSetup(self.config, prog)
        except (DataError, OSError, ValueError) as error:
            raise SystemExit(
                f"{prog}: {self.workdir}: cannot open the run's data ({' '.join(str(error).split())})"
            ) from None
        self.state = self.setup.restore(self.workdir)
        if self.state is None:
            raise SystemExit(f"{prog}: {self.workdir}: the run keeps no checkpoint")

    @property
    def dgr_text(self) -> str:
        dgr = self.config.dgr
        return f"DGR λ={dgr.weight:g}, K={dgr.num_dummy}" if dgr.on else "no DGR"


class FrozenFeatures:
    """The shared features of a trained encoder, frozen: what a probe or a freshly fitted
    head reads from a representation.

    ``mode="inference"`` (the default): running BatchNorm statistics, no dropout, as the
    evaluation step computes them (``make_eval_step`` runs the whole net so; here the
    encoder alone). ``mode="train"``: as the train step sees its features
    (``dgr_jax.objective.encode``): BatchNorm on the statistics of each batch, its updates
    discarded, so the state is unchanged. This is where DGR penalises the dummy-gradient
    norm, and in a short run, whose running statistics lag, the two can differ a lot.
    In training mode an example's features depend on the rest of its batch: ``batch_size``
    (the run's) cuts the collected examples into consecutive chunks of that size in their
    order (the last one shorter when it does not divide them); None keeps the batches as
    they come."""

    MODES = ("inference", "train")

    def __init__(self, net, mode: str = "inference", batch_size: int | None = None):
        import jax

        from dgr_jax.objective import encode

        if mode not in self.MODES:
            raise ValueError(f"encoder mode must be one of {self.MODES}, got {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mode, self.batch_size = mode, batch_size

        def features(encoder_params, batch_stats, images):
            if mode == "train":  # the encoder has no dropout: the key draws nothing
                return encode(net, encoder_params, batch_stats, images, jax.random.PRNGKey(0))[0]
            return net.encoder.apply(
                {"params": encoder_params, "batch_stats": batch_stats.get("encoder", {})},
                images,
                train=False,
            )

        self._features = jax.jit(features)

    def __call__(self, state, images):
        return self._features(state.params["encoder"], state.batch_stats, images)

    def collect(self, state, batches, names, max_examples: int | None = None):
        """``(features, targets)`` of the first ``max_examples`` examples (None: all) of
        ``batches``, concatenated on the host: the features' pytree (MTAN: one array per
        task) and ``{name: labels}`` for ``names``. Features are computed per batch as
        they come, or per chunk of ``batch_size`` (see the class)."""
        import jax
        import numpy as np

        images, targets, count = [], {name: [] for name in names}, 0
        for batch in batches:
            take = len(batch["image"]) if max_examples is None else max_examples - count
            if take <= 0:
                break
            images.append(np.asarray(batch["image"][:take]))
            for name in names:
                targets[name].append(np.asarray(batch[name][:take]))
            count += len(images[-1])
        if not images:
            raise ValueError("no examples to compute features of")
        if self.batch_size is not None:
            joined = np.concatenate(images)
            images = [
                joined[i : i + self.batch_size] for i in range(0, len(joined), self.batch_size)
            ]
        features = [jax.device_get(self(state, chunk)) for chunk in images]
        joined = jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *features)
        return joined, {name: np.concatenate(parts) for name, parts in targets.items()}


def comparison_parser(prog: str, description: str, default_workdir: str, dgr_weight: float = 0.1):
    """The parser of a command that compares finished runs, or trains a vanilla and a DGR
    run itself to compare (``comparison_configs``, ``comparison_runs``), with their
    flags; the command adds its own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--workdir",
        default=default_workdir,
        help=f"where the report, the figures and the runs it trains go (default {default_workdir})",
    )
    add(
        "--runs",
        nargs="+",
        metavar="DIR",
        help="workdirs of finished runs of any entry point (python -m experiments.<dataset> "
        "--workdir DIR, or the folders of another analysis), labelled by folder name; without "
        "it, a vanilla run (--dgr_weight 0) and a DGR run with the same seed are trained into "
        "<workdir>/vanilla and <workdir>/dgr (skipped when finished before)",
    )
    add(
        "--data_dir",
        metavar="DIR",
        help="the real data for the runs it trains (without it: built-in data at CPU sizes)",
    )
    add(
        "--dgr_weight",
        type=float,
        default=dgr_weight,
        help=f"lambda of the DGR run it trains (default {dgr_weight:g})",
    )
    return parser


# Set by a comparison for each run it trains (--dgr_weight: its own, of the DGR run).
COMPARISON_BLOCKED = ("--workdir", "--resume", "--overwrite", "--dry_run", "--dgr_weight")


def comparison_configs(parser, args, passed: list[str], dataset: str, builtin: list[str]) -> dict:
    """``{"vanilla": RunConfig, "dgr": RunConfig}`` of the two runs a comparison trains
    itself (``{}`` with ``--runs``): ``passed`` (the flags the command does not know) go
    to both, as to ``python -m experiments.<dataset>``; ``builtin`` stands for the data
    flags without ``--data_dir``. Errors are ``parser.error`` lines."""
    from experiments import cli
    from experiments.datasets import DATASETS

    if not args.dgr_weight > 0:
        parser.error(f"--dgr_weight must be > 0, got {args.dgr_weight}")
    refuse_flags(parser.error, passed, COMPARISON_BLOCKED, parser.prog)
    if args.runs:
        if passed:
            parser.error(
                f"unrecognized arguments: {' '.join(passed)} (run flags only apply to the runs "
                "it trains, not with --runs)"
            )
        for directory in args.runs:
            if finished_summary(Path(directory).expanduser()) is None:
                parser.error(
                    f"--runs {directory}: not a finished run (no summary.json with metrics)"
                )
        return {}
    spec = DATASETS[dataset]
    run_parser = cli.make_parser(spec)
    run_parser.prog = parser.prog  # its errors name this command
    _, unknown = run_parser.parse_known_args(passed)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    data = ["--data_dir", args.data_dir] if args.data_dir else list(builtin)
    configs = {}
    for label, weight in (("vanilla", 0.0), ("dgr", args.dgr_weight)):
        try:
            flags = run_parser.parse_args(data + passed + ["--dgr_weight", str(weight)])
            configs[label] = cli.build_config(spec, flags)
        except SystemExit as error:
            if isinstance(error.code, str):  # build_config's one line, "experiments.<x>: ..."
                parser.error(error.code.split(": ", 1)[-1])
            raise
    return configs


def comparison_runs(args, configs: dict, root: Path, prog: str) -> list[FinishedRun]:
    """The runs to compare: those of ``--runs``, or the ones of ``configs`` trained (or
    skipped, or resumed) in ``root/<label>``."""
    if args.runs:
        return [FinishedRun(Path(d).expanduser(), prog=prog) for d in args.runs]
    runs = []
    for label, config in configs.items():
        train_or_skip(config, root / label, f"[training] {label}", prog=prog)
        runs.append(FinishedRun(root / label, label, prog))
    return runs


def analysis_workdir(workdir: str, prog: str) -> Path:
    """An analysis command's --workdir, made if missing, with JAX's compilation cache in
    it (``use_compilation_cache``) and TFDS's chatter off; one line if it is a file."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # TFDS announces every builder config
    root = Path(workdir).expanduser()
    if root.exists() and not root.is_dir():
        raise SystemExit(f"{prog}: --workdir {root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(root)
    return root


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
