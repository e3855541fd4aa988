"""What the dataset entry points share: flags, model building, the dry run.

Each ``experiments/<dataset>.py`` is a thin ``main`` that calls ``run(dataset, argv)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (input only) logs at import otherwise

from data_pipelines.common import DataError  # noqa: E402
from dgr_jax import parallel, weighting
from dgr_jax import tasks as task_lib
from dgr_jax.models import ModelConfig, build_model, count_params
from dgr_jax.penalty import METHODS
from experiments.train_lib import RunConfig


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple
    image_size: tuple[int, int]
    networks: tuple[str, ...]
    command: str
    optimizer: str  # the paper's recipe
    lr: float
    batch_size: int
    epochs: int
    data_help: str  # where the data goes


DATASETS = {
    "nyuv2": DatasetSpec("nyuv2", task_lib.NYUV2, (288, 384), ("split", "mtan"), "experiments.nyuv2",
                         "sgd", 0.1, 4, 200, "the NYUv2 .npy folders: DIR/{train,val}/{image,label,depth,normal}/{i}.npy "
                         "(see data_pipelines/nyuv2.py)"),
    "cityscapes": DatasetSpec("cityscapes", task_lib.CITYSCAPES, (256, 512), ("split", "mtan"),
                              "experiments.cityscapes", "sgd", 0.1, 4, 200,
                              "the Cityscapes .npy folders: DIR/{train,val}/{image,label_19,part_seg,depth}/{i}.npy "
                              "(see data_pipelines/cityscapes.py)"),
    "utkface": DatasetSpec("utkface", task_lib.UTKFACE, (64, 64), ("split",), "experiments.utkface",
                           "adam", 1e-3, 64, 100, "a folder of UTKFace age_gender_race_date*.jpg files"),
    "multidigits": DatasetSpec("multidigits", task_lib.MULTIDIGITS, (12, 24), ("split",), "experiments.multidigits",
                               "adam", 1e-3, 64, 20, "nothing: MultiDigits is built from scikit-learn's bundled digits"),
}

# --synthetic: sizes that run in minutes on 2 CPU cores (structure unchanged, widths cut).
CPU_PRESET = dict(backbone=18, base_width=16, stage_sizes=(1, 2, 1, 1), head_width=32, dgr_weight=0.1, epochs=8)


def make_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    scenes = spec.name in ("nyuv2", "cityscapes")
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.command}",
        description=f"DGR multi-task learning on {spec.name} "
        f"(tasks: {', '.join(t.name for t in spec.tasks)}; input {spec.image_size[0]}x{spec.image_size[1]}). "
        f"Trains, evaluates every epoch, checkpoints to --workdir and reports the paper's metrics with "
        f"delta_m. Defaults are the paper's recipe.",
        epilog=f"examples:\n  python -m {spec.command} --synthetic --dgr_weight 0.1   # built-in data, CPU-sized\n"
               f"  python -m {spec.command} --data_dir DIR --weighting dwa --dgr_weight 0.1\n"
               f"  python -m {spec.command} --dry_run                      # full-size model on abstract shapes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--network", choices=spec.networks, default="split",
                        help="split: shared ResNet + one head per task; mtan: task attention on a "
                        "shared dilated ResNet (default split)")
    parser.add_argument("--backbone", type=int, choices=(18, 34, 50, 101), default=None,
                        help="ResNet depth (default 50, the paper's; 18 with --synthetic)")
    parser.add_argument("--weighting", choices=sorted(weighting.METHODS), default="equal",
                        help="multi-task weighting method (default equal)")
    parser.add_argument("--method_args", default=None, metavar="KEY=VALUE,...",
                        help="hyper-parameters of the weighting method (defaults: the original code's): "
                        + "; ".join(f"{name}: " + (", ".join(f"{k}={v}" for k, v in weighting.method_arguments(name).items())
                                                   or "none") for name in sorted(weighting.METHODS))
                        + ". Kendall et al.'s uncertainty form: scale=1,initial_log_var=0,weight_decay=false")
    parser.add_argument("--dgr_weight", type=float, default=None,
                        help="lambda, the DGR penalty's weight; 0 turns DGR off (default 0; 0.1 with --synthetic)")
    parser.add_argument("--num_dummy", type=int, default=3, help="K, dummy head sets for DGR (default 3)")
    parser.add_argument("--dgr_method", choices=METHODS + ("paper",), default="exact",
                        help="how the penalty's gradient is computed: exact (forward-over-reverse, default), "
                        "double_backprop (reference), finite_difference (the paper's estimator at the feature "
                        "level), paper (the original algorithm through the whole model; with --squared_norm --num_dummy 1 "
                        "it is the original code's update)")
    parser.add_argument("--fd_eps", type=float, default=1e-3,
                        help="finite-difference step for finite_difference / paper (default 1e-3)")
    parser.add_argument("--squared_norm", action="store_true",
                        help="penalise ||g||^2 (the original code's objective) instead of ||g|| (the paper's "
                        "text). The original code's update: --dgr_method paper --squared_norm --num_dummy 1")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated subset of {','.join(t.name for t in spec.tasks)}; "
                        "one task gives the single-task baseline (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {spec.epochs}; 8 with --synthetic)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"global batch size (default {spec.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {spec.lr})")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=spec.optimizer,
                        help="sgd: momentum 0.9, weight decay 1e-4, cosine schedule; adam (default "
                        f"{spec.optimizer}, the paper's for {spec.name})")
    parser.add_argument("--data_dir", default=None, help=f"where the data is: {spec.data_help}")
    parser.add_argument("--synthetic", action="store_true",
                        help="train on built-in data instead" + (" (procedural scenes, 96x128)" if scenes else "")
                        + ", with a CPU-sized preset: ResNet-18 with reduced widths, 8 epochs, DGR on "
                        "(lambda 0.1); flags given explicitly still win")
    parser.add_argument("--reference", default=None, metavar="JSON",
                        help="single-task metrics for delta_m, e.g. from your own single-task runs' "
                        "summary.json (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    parser.add_argument("--workdir", default=None,
                        help=f"where checkpoints, metrics and reports go (default runs/{spec.name})")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    parser.add_argument("--checkpoint_every", type=int, default=0,
                        help="save every N steps as well as at every epoch end (default 0: epoch ends only)")
    parser.add_argument("--num_devices", type=int, default=None,
                        help="devices on the data-parallel mesh (default all)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    conventions = parser.add_argument_group(
        "conventions", "Defaults train what the original code (the DGR repository on auto-lambda) trains; "
        "the alternatives are dgr_jax's own choices (README, Fidelity)")
    conventions.add_argument("--normal_loss", choices=("l1", "cosine"), default="l1",
                             help="surface-normal loss: l1, the L1 distance between unit normals summed over "
                             "channels, mean over valid pixels (the original's, default); cosine, 1 - cos")
    conventions.add_argument("--head_dropout", type=float, default=0.0,
                             help="dropout after the DeepLabV3 heads' ASPP projection (default 0, the original's; "
                             "torchvision's DeepLabHead uses 0.5)")
    conventions.add_argument("--bn_running_var", choices=("unbiased", "biased"), default="unbiased",
                             help="BatchNorm running-variance update: unbiased n/(n-1), PyTorch's and the "
                             "original's (default); biased, Flax's")
    conventions.add_argument("--resize_rule", choices=("legacy", "half_pixel"), default="legacy",
                             help="augmentation resizing of labels, depth and normals: legacy, PyTorch's nearest "
                             "(floor rule) with truncated sizes, the original's (default); half_pixel, nearest "
                             "with half-pixel centres and rounded sizes")
    conventions.add_argument("--drop_last", action="store_true",
                             help="drop a short last training batch (the original keeps it; several processes "
                             "always drop it)")
    conventions.add_argument("--lr_schedule", choices=("epoch", "step"), default="epoch",
                             help="SGD's cosine schedule stepped once per epoch, as the original's "
                             "CosineAnnealingLR (default), or every step")
    parser.add_argument("--dry_run", action="store_true",
                        help="build the full-size model on abstract shapes (no large allocation), "
                        "print a summary and a JSON line of parameter counts, and exit")
    return parser


def model_config(spec: DatasetSpec, args) -> ModelConfig:
    network = "split" if spec.name in ("utkface", "multidigits") else args.network
    return RunConfig(dataset=spec.name, network=network, backbone=args.backbone or 50).model_config()


def dry_run(spec: DatasetSpec, args) -> dict:
    """Shapes and parameter counts of the full model via ``jax.eval_shape``."""
    net = build_model(model_config(spec, args), spec.tasks)
    images = jax.ShapeDtypeStruct((args.batch_size, *spec.image_size, 3), jnp.float32)

    def init(key, images):
        variables = net.init(key, images, train=False)
        features, outputs = net.apply(variables, images, train=False)
        keys = jax.random.split(key, args.num_dummy)
        dummy = jax.vmap(lambda k: net.heads.init(k, features, spec.image_size, train=False)["params"])(keys)
        return variables, features, outputs, dummy

    variables, features, outputs, dummy = jax.eval_shape(init, jax.random.PRNGKey(0), images)
    params = variables["params"]
    counts = {
        "encoder_params": count_params(params["encoder"]),
        "head_params": count_params(params["heads"]),
        "dummy_params": count_params(dummy),
    }
    counts["total_params"] = sum(counts.values())

    def shape_of(tree):
        return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)

    print(f"{spec.name}: {args.network} network, ResNet-{args.backbone}"
          f"{' (dilated, output stride 8)' if spec.name in ('nyuv2', 'cityscapes') else ''}, "
          f"input {tuple(images.shape)}")
    print(f"  encoder           {counts['encoder_params']:>12,} params")
    for group, size in _encoder_groups(params["encoder"], spec.tasks).items():
        print(f"    {group:<28} {size:>12,}")
    for task in spec.tasks:
        size = count_params({k: v for k, v in params["heads"].items()
                             if k == task.name or k.startswith(f"{task.name}_fc")})
        print(f"  head {task.name:<12} {size:>12,} params  -> output {shape_of(outputs)[task.name]}")
    print(f"  dummy sets        {counts['dummy_params']:>12,} params  ({args.num_dummy} stacked copies of the heads)")
    print(f"  running stats     {count_params(variables.get('batch_stats', {})):>12,} (not parameters)")
    print(f"  features read by heads and dummy sets: {shape_of(features)}")
    print(json.dumps(counts))
    return counts


def _encoder_groups(encoder_params, tasks) -> dict[str, int]:
    """Readable parameter groups: backbone stem and stages, MTAN attention and shared blocks."""
    backbone = encoder_params.get("backbone", encoder_params)
    groups = {"backbone stem": 0}
    for name, subtree in sorted(backbone.items()):
        group = "backbone " + ("stem" if name.startswith("stem") else name.split("_")[0])
        groups[group] = groups.get(group, 0) + count_params(subtree)
    for name, subtree in encoder_params.items():
        if name == "backbone" or backbone is encoder_params:
            continue
        task = next((t.name for t in tasks if name.startswith(f"{t.name}_att")), None)
        group = f"attention masks ({task})" if task else "shared attention blocks"
        groups[group] = groups.get(group, 0) + count_params(subtree)
    return groups


def _fail(spec: DatasetSpec, message: str):
    sys.exit(f"{spec.command}: {message}")


def run_config(spec: DatasetSpec, args) -> RunConfig:
    """Flags -> RunConfig, with one-line errors for values that cannot work."""
    for name, low in (("num_dummy", 1), ("batch_size", 1), ("epochs", 1), ("steps", 1), ("checkpoint_every", 0),
                      ("num_devices", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            _fail(spec, f"--{name} must be >= {low}, got {value}")
    if args.dgr_weight is not None and args.dgr_weight < 0:
        _fail(spec, f"--dgr_weight must be >= 0, got {args.dgr_weight}")
    for name in ("fd_eps", "lr"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            _fail(spec, f"--{name} must be > 0, got {value}")
    tasks = None
    if args.tasks is not None:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        names = [t.name for t in spec.tasks]
        unknown = [t for t in tasks if t not in names]
        if unknown or not tasks:
            _fail(spec, f"--tasks: {', '.join(unknown) or '(empty)'} is not a task of {spec.name}; "
                  f"choose from {', '.join(names)}")
    if not 0.0 <= args.head_dropout < 1.0:
        _fail(spec, f"--head_dropout must be in [0, 1), got {args.head_dropout}")
    method_args = parse_method_args(spec, args.weighting, args.method_args)
    preset = CPU_PRESET if args.synthetic else {}
    reference = None
    if args.reference is not None:
        path = Path(args.reference)
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            _fail(spec, f"--reference {path}: cannot read JSON ({error})")
        reference = loaded.get("metrics", loaded) if isinstance(loaded, dict) else None
        if not isinstance(reference, dict):
            _fail(spec, f"--reference {path}: expected a JSON object of metrics")
    needs_data = spec.name != "multidigits"
    if needs_data and not args.synthetic and not args.dry_run:
        if args.data_dir is None:
            _fail(spec, f"no data: pass --data_dir DIR with {spec.data_help}, or --synthetic to run on built-in data")
        if not Path(args.data_dir).expanduser().is_dir():
            _fail(spec, f"--data_dir {args.data_dir}: no such folder (expected {spec.data_help}); "
                  "or use --synthetic to run on built-in data")
    return RunConfig(
        dataset=spec.name,
        network=args.network,
        backbone=args.backbone or preset.get("backbone", 50),
        base_width=preset.get("base_width", 64),
        stage_sizes=preset.get("stage_sizes"),
        head_width=preset.get("head_width", 256),
        tasks=tasks,
        weighting=args.weighting,
        method_args=method_args,
        dgr_weight=args.dgr_weight if args.dgr_weight is not None else preset.get("dgr_weight", 0.0),
        num_dummy=args.num_dummy,
        dgr_method=args.dgr_method,
        fd_eps=args.fd_eps,
        squared_norm=args.squared_norm,
        epochs=args.epochs or preset.get("epochs", spec.epochs),
        steps=args.steps,
        batch_size=args.batch_size or spec.batch_size,
        lr=args.lr or spec.lr,
        optimizer=args.optimizer,
        weight_decay=1e-4 if args.optimizer == "sgd" else 0.0,
        data_dir=None if args.data_dir is None else str(Path(args.data_dir).expanduser()),
        synthetic=args.synthetic,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        reference=reference,
        num_devices=args.num_devices,
        normal_loss=args.normal_loss,
        head_dropout=args.head_dropout,
        bn_running_var=args.bn_running_var,
        resize_rule=args.resize_rule,
        drop_last=args.drop_last,
        lr_schedule=args.lr_schedule,
    )


def parse_method_args(spec: DatasetSpec, method: str, text: str | None) -> dict | None:
    """``--method_args a=1,b=false`` -> ``{"a": 1.0, "b": False}``, each value converted to
    the type of the argument's default; one-line errors for unknown keys and bad values."""
    if text is None:
        return None
    known = weighting.method_arguments(method)
    parsed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            _fail(spec, f"--method_args: {item!r} is not KEY=VALUE")
        if key not in known:
            listing = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            _fail(spec, f"--method_args: {method} has no argument {key!r}; its arguments: {listing}")
        default = known[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                parsed[key] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                parsed[key] = int(value)
            else:
                parsed[key] = float(value)
        except ValueError:
            _fail(spec, f"--method_args: {key}={value!r} is not a {type(default).__name__}")
    try:
        weighting.get_method(method, **parsed)
    except ValueError as error:
        _fail(spec, f"--method_args: {error}")
    return parsed


def run(dataset: str, argv=None):
    spec = DATASETS[dataset]
    args = make_parser(spec).parse_args(argv)
    config = run_config(spec, args)
    if args.dry_run:
        args.backbone = args.backbone or 50
        args.batch_size = args.batch_size or spec.batch_size
        return dry_run(spec, args)
    from experiments.train_lib import train_and_evaluate

    parallel.initialize_distributed()
    workdir = Path(args.workdir or f"runs/{spec.name}").expanduser()
    start = time.perf_counter()
    try:
        summary = train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress)
    except (DataError, ValueError, FloatingPointError, FileNotFoundError) as error:
        _fail(spec, str(error))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return summary
