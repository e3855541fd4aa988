"""``train_and_evaluate(config, workdir)``: the whole run behind every dataset entry point.

Data (``data_pipelines``) -> global batches on a ``data`` mesh -> the pure, jitted
``dgr_jax.train`` step -> evaluation with ``dgr_jax.metrics`` (whole-set statistics) and
Δm -> JSON lines, TensorBoard, Orbax checkpoints (latest for ``resume``, best by Δm) ->
a summary JSON, a markdown row beside the paper's, and a PNG of the curves.

Resume is exact: the checkpoint holds the whole train state (parameters, optimizer and
method state, RNG) and the data position (epoch, step within it); the input order is a
function of (seed, epoch) only, so the resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgr_jax import metrics as metric_lib
from dgr_jax import parallel
from dgr_jax import tasks as task_lib
from dgr_jax import weighting
from dgr_jax.checkpoint import Checkpoints, abstract_like
from dgr_jax.models import ModelConfig, build_model
from dgr_jax.objective import DGRConfig
from dgr_jax.train import end_epoch, init_train_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Defaults are the paper's NYUv2 recipe."""

    dataset: str = "nyuv2"
    network: str = "split"  # split | mtan (scenes); utkface/multidigits use the classifier
    backbone: int = 50
    base_width: int = 64  # 64: the real ResNet; smaller for CPU presets and tests
    stage_sizes: tuple[int, ...] | None = None
    head_width: int = 256
    tasks: tuple[str, ...] | None = None  # a subset of the dataset's tasks; one = single-task baseline
    weighting: str = "equal"
    method_args: dict | None = None  # hyper-parameters of the weighting method (defaults: its paper's)
    dgr_weight: float = 0.0
    num_dummy: int = 3
    dgr_method: str = "exact"
    fd_eps: float = 1e-3
    squared_norm: bool = False
    epochs: int = 200
    steps: int | None = None  # overrides epochs: stop after this many steps
    batch_size: int = 4
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (momentum 0.9, cosine) | adam
    weight_decay: float = 1e-4
    data_dir: str | None = None
    synthetic: bool = False
    synthetic_size: tuple[int, int] = (96, 128)
    synthetic_counts: tuple[int, int] = (64, 16)  # train, val examples of built-in data
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    reference: dict | None = None  # single-task metrics for Δm; None: the paper's
    num_devices: int | None = None
    # Conventions. Defaults are the original code's (README "Fidelity"); the alternatives
    # are ours.
    normal_loss: str = "l1"  # l1 between unit normals | cosine (1 - cos)
    head_dropout: float = 0.0  # dropout after ASPP's projection (torchvision: 0.5)
    bn_running_var: str = "unbiased"  # unbiased (PyTorch) | biased (Flax)
    resize_rule: str = "legacy"  # legacy (PyTorch's nearest, truncated sizes) | half_pixel
    drop_last: bool = False  # drop a short last training batch (the original keeps it)
    lr_schedule: str = "epoch"  # cosine stepped once per epoch (the original) | step

    def task_records(self) -> tuple[task_lib.Task, ...]:
        available = task_lib.DATASETS[self.dataset]
        if self.tasks is not None:
            names = [t.name for t in available]
            unknown = [t for t in self.tasks if t not in names]
            if unknown or not self.tasks:
                raise ValueError(f"--tasks: {', '.join(unknown) or '(empty)'} not a task of {self.dataset}; "
                                 f"choose from {', '.join(names)}")
            available = tuple(t for t in available if t.name in self.tasks)
        return tuple(dataclasses.replace(t, loss_name=self.normal_loss) if t.kind == "normal" else t
                     for t in available)

    def model_config(self) -> ModelConfig:
        classifier = self.dataset in ("utkface", "multidigits")
        return ModelConfig(network="classifier" if classifier else self.network, depth=self.backbone,
                           dilated=not classifier, base_width=self.base_width,
                           stage_sizes=self.stage_sizes, head_width=self.head_width,
                           dropout_rate=self.head_dropout,
                           bn_unbiased_running_var=self.bn_running_var == "unbiased")

    def method(self) -> weighting.MTLMethod:
        return weighting.get_method(self.weighting, **(self.method_args or {}))

    def dgr_config(self) -> DGRConfig:
        return DGRConfig(weight=self.dgr_weight, num_dummy=self.num_dummy, method=self.dgr_method,
                         squared=self.squared_norm, fd_eps=self.fd_eps)


# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Data:
    train_epoch: Callable[[int, int], Any]  # (epoch, start_step) -> sized iterable of numpy batches
    evaluation: Callable[[], Iterable]
    description: str


def make_data(config: RunConfig) -> Data:
    """The dataset's pipelines, on the user's folder or the built-in data."""
    name, batch = config.dataset, config.batch_size
    process_index, process_count = jax.process_index(), jax.process_count()
    if batch % process_count:
        raise ValueError(f"--batch_size {batch} is not divisible by the {process_count} processes")
    local = batch // process_count
    shard = dict(process_index=process_index, process_count=process_count)
    # A short last batch is kept, as the original's data loader keeps it; several
    # processes drop it, since their shards (which differ by up to one example) would
    # otherwise end the epoch with different batch counts.
    drop_last = config.drop_last or process_count > 1
    if name in ("nyuv2", "cityscapes"):
        from data_pipelines import cityscapes, nyuv2, scenes, synthetic

        module = nyuv2 if name == "nyuv2" else cityscapes
        if config.synthetic:
            height, width = config.synthetic_size
            root = synthetic.synthetic_root(name, num_train=config.synthetic_counts[0],
                                            num_val=config.synthetic_counts[1], height=height, width=width,
                                            seed=0)
            description = f"built-in procedural scenes in the {name} format ({root})"
        else:
            root, description = Path(config.data_dir), f"{name} from {config.data_dir}"
        module.prepare(root)
        augmentation = dataclasses.replace(module.FORMAT.augmentation, resize_rule=config.resize_rule)

        def train_epoch(epoch, start_step):
            return module.make_dataset(root, "train", local, seed=config.seed, epoch=epoch,
                                       start_step=start_step, verbose=False, drop_remainder=drop_last,
                                       augmentation=augmentation, **shard)

        def evaluation():
            return module.make_dataset(root, "val", local, verbose=False, **shard)

        return Data(train_epoch, evaluation, description)
    if name == "utkface":
        from data_pipelines import utkface

        if config.synthetic:
            root = _fake_utkface_root(utkface, sum(config.synthetic_counts) * 4)
            description = f"built-in generated faces in the UTKFace layout ({root})"
        else:
            root, description = Path(config.data_dir), f"UTKFace from {config.data_dir}"

        def train_epoch(epoch, start_step):
            return utkface.make_dataset(root, "train", local, augment=True, seed=config.seed, epoch=epoch,
                                        start_step=start_step, drop_remainder=drop_last, **shard)

        def evaluation():
            return utkface.make_dataset(root, "test", local, **shard)

        return Data(train_epoch, evaluation, description)
    if name == "multidigits":
        from data_pipelines import multidigits

        def train_epoch(epoch, start_step):
            return multidigits.make_dataset("train", local, seed=config.seed, epoch=epoch,
                                            start_step=start_step, drop_remainder=drop_last, **shard)

        def evaluation():
            return multidigits.make_dataset("test", local, **shard)

        return Data(train_epoch, evaluation, "MultiDigits (pairs of scikit-learn's handwritten digits)")
    raise ValueError(f"unknown dataset {name!r}")


def _fake_utkface_root(utkface, count: int) -> Path:
    from data_pipelines.common import cache_root

    root = cache_root() / "synthetic" / f"utkface_fake_{count}"
    if not root.exists():
        tmp = root.with_name(root.name + f".tmp{np.random.randint(1 << 30)}")
        utkface.write_fake_utkface(tmp, count, seed=0)
        try:
            tmp.rename(root)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------
# Optimiser


def learning_rate_schedule(config: RunConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Cosine from ``lr`` to 0. ``lr_schedule="epoch"`` (the original's
    ``CosineAnnealingLR(T_max=epochs)``, stepped once per epoch): epoch e trains at
    ``lr (1 + cos(pi e / E)) / 2`` for all its steps; ``"step"``: the same curve per step."""
    if config.lr_schedule == "step":
        return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
    if config.lr_schedule != "epoch":
        raise ValueError(f"--lr_schedule must be epoch or step, got {config.lr_schedule!r}")
    num_epochs = max(-(-total_steps // steps_per_epoch), 1)
    per_epoch = optax.cosine_decay_schedule(config.lr, num_epochs)
    return lambda count: per_epoch(count // steps_per_epoch)


def make_optimizer(config: RunConfig, total_steps: int, steps_per_epoch: int | None = None,
                   method: weighting.MTLMethod | None = None) -> optax.GradientTransformation:
    """The paper's recipes: SGD (momentum 0.9, weight decay, cosine schedule) for scenes,
    Adam for UTKFace. Weight decay applies to the trained parameters, and to the method's
    parameters where ``method.decay_params`` (uncertainty's log-variances, as the original
    code's single SGD parameter group); the dummy sets are not in the optimised pytree."""
    decay_method = method is not None and method.decay_params

    def decayed(params):
        return {k: jax.tree_util.tree_map(lambda _: k != "method" or decay_method, v) for k, v in params.items()}

    decay = optax.add_decayed_weights(config.weight_decay, mask=decayed)
    if config.optimizer == "sgd":
        schedule = learning_rate_schedule(config, steps_per_epoch or max(total_steps, 1), total_steps)
        return optax.chain(decay, optax.sgd(schedule, momentum=0.9))
    if config.optimizer == "adam":
        return optax.chain(decay, optax.adam(config.lr))
    raise ValueError(f"--optimizer must be sgd or adam, got {config.optimizer!r}")


# ---------------------------------------------------------------------------
# Output


class Writers:
    """JSON lines and TensorBoard event files in the workdir (process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        if enabled:
            import tensorflow as tf  # experiments may use TF; dgr_jax never does

            tf.config.set_visible_devices([], "GPU")
            self._tf = tf
            self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        if not self.enabled:
            return
        with open(self.workdir / f"{kind}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in values.items()}}) + "\n")
        with self._tb.as_default(step=step):
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tf.summary.scalar(f"{kind}/{key}", value)
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _plot_curves(workdir: Path, tasks) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(kind):
        path = workdir / f"{kind}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    train, evals = read("train"), read("eval")
    if not train:
        return None
    keys = [f"loss/{t.name}" for t in tasks] + ["dgr/penalty"]
    figure, axes = plt.subplots(1, 1 + len(tasks), figsize=(4.2 * (1 + len(tasks)), 3.8))
    for key in keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points and any(v for _, v in points):
            axes[0].plot(*zip(*points), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    for axis, t in zip(axes[1:], tasks):  # one panel per task: the metrics have different scales
        key = metric_lib.headline_key(t)
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axis.plot(*zip(*points), marker="o")
        axis.set_xlabel("step")
        axis.set_title(f"eval {key}")
    figure.tight_layout()
    path = workdir / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------
# The run


def evaluate(eval_step, state, data: Data, tasks, mesh, reference=None) -> tuple[dict, dict]:
    """``(metrics, paper_metrics)``: whole-set statistics (ours) and the paper's per-batch
    running means (``metrics.compute_paper_metrics``), each with its ``delta_m`` when a
    reference is given."""
    metric_state = metric_lib.init_metric_state(tasks)
    for batch in data.evaluation():
        batch = {k: v for k, v in batch.items() if k == "image" or k in {t.name for t in tasks}}
        # Any batch size (the last may be short): evaluation runs replicated.
        metric_state = eval_step(state, parallel.replicate(batch, mesh), metric_state)
    metric_state = jax.device_get(metric_state)
    results = metric_lib.compute_metrics(tasks, metric_state), metric_lib.compute_paper_metrics(tasks, metric_state)
    if reference:
        for values in results:
            values["delta_m"] = metric_lib.delta_m(values, reference, tasks)
    return results


def train_and_evaluate(config: RunConfig, workdir: str | Path, *, resume: bool = False,
                       stop_after: int | None = None, log: Callable[[str], None] = print,
                       progress: bool = True) -> dict:
    """Train, evaluate every ``eval_every`` epochs, checkpoint, report; returns the summary.

    ``stop_after``: end the run early after this many steps in total (to simulate an
    interruption; the checkpoint then lets ``resume=True`` continue it).
    """
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = config.task_records()
    main_process = jax.process_index() == 0
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch_size(config.batch_size, mesh)
    data = make_data(config)
    steps_per_epoch = len(data.train_epoch(0, 0))
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {config.batch_size} is larger than the training set")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    net = build_model(config.model_config(), tasks)
    dgr = config.dgr_config()
    method = config.method()
    optimizer = make_optimizer(config, total_steps, steps_per_epoch, method)
    first = next(iter(data.train_epoch(0, 0)))
    sample = jnp.asarray(first["image"][:1])
    state = jax.jit(lambda key: init_train_state(net, optimizer, key, sample, config.num_dummy, method, len(tasks)),
                    out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))
    checkpoints = Checkpoints(workdir)
    position = {"epoch": 0, "step_in_epoch": 0}
    if resume and checkpoints.latest_step() is not None:
        state, position = checkpoints.restore(abstract_like(state))
        log(f"resumed from step {int(state.step)} (epoch {position['epoch']}, step {position['step_in_epoch']} in it)")
    elif main_process:
        for stale in ("train.jsonl", "eval.jsonl"):
            (workdir / stale).unlink(missing_ok=True)
    reference = config.reference if config.reference is not None else metric_lib.PAPER_SINGLE_TASK.get(config.dataset)
    if config.reference is None and reference and config.synthetic:
        log("note: Δm is against the paper's single-task results on the real data set; on built-in data "
            "pass --reference with your own single-task runs' summary.json for a meaningful Δm")
    writers = Writers(workdir, main_process)
    train_step = parallel.jit_train_step(make_train_step(net, tasks, dgr, optimizer, method), mesh)
    eval_step = jax.jit(make_eval_step(net, tasks))
    finish_epoch = jax.jit(lambda s: end_epoch(method, s), out_shardings=parallel.replicated(mesh))
    log(f"{config.dataset}: {config.model_config().network} ResNet-{config.backbone}, tasks "
        f"{', '.join(t.name for t in tasks)}, weighting {config.weighting}, "
        f"DGR {'off' if config.dgr_weight == 0 else f'λ={config.dgr_weight} ({config.dgr_method}, K={config.num_dummy})'}; "
        f"{data.description}; {steps_per_epoch} steps/epoch, {total_steps} steps on {mesh.shape['data']} device(s)")

    step = int(state.step)
    last_eval: dict[str, float] = {}
    last_paper: dict[str, float] = {}
    history = []
    bar = _progress(total_steps, step, progress and main_process)
    epoch = position["epoch"]
    start = position["step_in_epoch"]
    pending = None  # log the previous step's metrics so the host never waits on the device
    stopped = False
    while step < total_steps and not stopped:
        for batch in data.train_epoch(epoch, start):
            batch = {k: v for k, v in batch.items() if k == "image" or k in {t.name for t in tasks}}
            state, metrics = train_step(state, parallel.global_batch(batch, mesh))
            step += 1
            start += 1
            if pending is not None:
                _log_train(writers, *pending)
            pending = (step, metrics)
            bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoints.save(step, state, {"epoch": epoch, "step_in_epoch": start})
            if step >= total_steps:
                break
            if stop_after is not None and step >= stop_after:
                stopped = True
                break
        if pending is not None:
            _log_train(writers, *pending)
            pending = None
        epoch_done = start >= steps_per_epoch
        if epoch_done:
            state = finish_epoch(state)
            epoch, start = epoch + 1, 0
        checkpoints.save(step, state, {"epoch": epoch, "step_in_epoch": start})
        if epoch_done and (epoch % config.eval_every == 0 or step >= total_steps):
            last_eval, last_paper = evaluate(eval_step, state, data, tasks, mesh, reference)
            if "delta_m" in last_eval:
                checkpoints.save_best(step, state, {"epoch": epoch, "step_in_epoch": 0}, last_eval)
            row = {"epoch": epoch, **last_eval, **{f"paper/{k}": v for k, v in last_paper.items()}}
            writers.scalars(step, row, "eval")
            history.append({"step": step, **row})
            bar.write(f"epoch {epoch} step {step}: " + _format_metrics(last_eval, last_paper, tasks))
    bar.close()
    checkpoints.wait()
    checkpoints.close()
    if stopped:
        writers.close()
        log(f"stopped after step {step}; resume with --resume")
        return {"stopped_at": step}
    if not last_eval:
        last_eval, last_paper = evaluate(eval_step, state, data, tasks, mesh, reference)
        writers.scalars(step, {"epoch": epoch, **last_eval, **{f"paper/{k}": v for k, v in last_paper.items()}},
                        "eval")
    writers.close()
    summary = {"config": _config_dict(config), "steps": step, "metrics": last_eval,
               "metrics_paper": last_paper, "conventions": METRIC_CONVENTIONS,
               "reference": reference, "history": history}
    if main_process:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
        table = results_table(config, tasks, last_eval, last_paper)
        (workdir / "results.md").write_text(table + "\n")
        curves = _plot_curves(workdir, tasks)
        log("\n" + table)
        log(f"wrote {workdir / 'summary.json'}, {workdir / 'results.md'}"
            f"{', ' + str(curves) if curves else ''}, TensorBoard events in {workdir / 'tensorboard'}")
    return summary


def _log_train(writers, step, metrics):
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)}; stopping (lower --lr or --dgr_weight)")
    writers.scalars(step, values, "train")


METRIC_CONVENTIONS = {
    "metrics": "whole-set statistics (dgr_jax's): every metric from sums over the whole evaluation set",
    "metrics_paper": "the paper's (auto-lambda's TaskMetric): per-batch values averaged over batches, "
                     "weighted by batch size; mIoU over every class (NaN if one never occurs); "
                     "normals valid where their channels do not sum to 0",
}


def _format_metrics(values, paper, tasks) -> str:
    parts = [f"{metric_lib.headline_key(t)} {values[metric_lib.headline_key(t)]:.4f}" for t in tasks]
    if "delta_m" in values:
        parts.append(f"Δm {values['delta_m'] * 100:+.2f}% (paper's convention {paper['delta_m'] * 100:+.2f}%)")
    return ", ".join(parts)


def _config_dict(config: RunConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def results_table(config: RunConfig, tasks, values: dict[str, float], paper_values: dict[str, float]) -> str:
    """Our rows in the paper's table format (headline metric per task, Δm): in the paper's
    metric convention, which is the one to compare with the paper's row beside it (where
    the paper has one), and in ours (whole-set statistics)."""
    keys = [metric_lib.headline_key(t) for t in tasks]
    method = metric_lib.paper_method_name(config.weighting, config.dgr_weight > 0)
    header = "| run | " + " | ".join(keys) + " | Δm |"
    rule = "|" + "---|" * (len(keys) + 2)

    def row(name, source):
        cells = [f"{source[k]:.4f}" if k in source else "-" for k in keys]
        dm = source.get("delta_m")
        return f"| {name} | " + " | ".join(cells) + f" | {'-' if dm is None else f'{dm * 100:+.2f}%'} |"

    lines = [header, rule, row(f"this run: {method} (paper's convention)", paper_values),
             row(f"this run: {method} (whole-set)", values)]
    paper = metric_lib.paper_rows(config.dataset, config.network if config.dataset in ("nyuv2", "cityscapes") else None)
    if paper and method in paper:
        lines.append(row(f"paper: {method}", paper[method]))
    lines.append("")
    lines.append("The paper's row compares with this run's first row (per-batch running means, as "
                 "auto-lambda's TaskMetric); the whole-set row is dgr_jax's convention.")
    return "\n".join(lines)


class _NoBar:
    def update(self, n):
        pass

    def write(self, text):
        print(text, flush=True)

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
