"""The command line every dataset entry point shares: flags -> ``RunConfig`` -> the run.

Each ``experiments/<dataset>.py`` is a thin ``main`` that calls ``run(dataset, argv)``.
Values come, in increasing priority, from the records' defaults, the data set's recipe
(``DatasetSpec.recipe``), the CPU preset of ``--synthetic`` (``CPU_PRESET``) and the
flags given. Every check of a value lives in the configuration records
(``experiments.config``); a bad value ends in one line naming its flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # TensorFlow (input only) logs at import otherwise

from data_pipelines.common import DataError  # noqa: E402
from dgr_jax import methods, parallel, pta, regularizers  # noqa: E402
from dgr_jax.checkpoint import CheckpointError  # noqa: E402
from dgr_jax.errors import ConfigError  # noqa: E402
from dgr_jax.models import BACKBONES, ModelConfig  # noqa: E402
from dgr_jax.objective import DGR_ESTIMATORS, DGRConfig  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments.config import (  # noqa: E402
    DataConfig,
    MethodConfig,
    RegularizerConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    describe_field,
    field_path,
)
from experiments.datasets import DATASETS, DatasetSpec  # noqa: E402

# --synthetic: sizes that run in minutes on 2 CPU cores (structure unchanged, widths cut).
CPU_PRESET = {
    "model": dict(backbone="resnet18", base_width=16, stage_sizes=(1, 2, 1, 1), head_width=32),
    "dgr": dict(weight=0.1),
    "train": dict(epochs=8),
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 96x128, got {text!r}")
    return int(parts[0]), int(parts[1])


def make_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    recipe = spec.recipe
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.command}",
        description=f"DGR multi-task learning on {spec.name} "
        f"(tasks: {', '.join(t.name for t in spec.tasks)}; input {spec.image_size[0]}x{spec.image_size[1]}). "
        f"Trains, evaluates every epoch, checkpoints to --workdir and reports the paper's metrics with "
        f"delta_m. Defaults are the paper's recipe and the original code's conventions.",
        epilog=f"examples:\n  python -m {spec.command} --synthetic --dgr_weight 0.1   # built-in data, CPU-sized\n"
        f"  python -m {spec.command} --data_dir DIR --weighting dwa --dgr_weight 0.1\n"
        f"  python -m {spec.command} --dry_run                      # full-size model on abstract shapes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--network",
        dest="model.network",
        choices=spec.networks,
        default=None,
        help=f"{' | '.join(spec.networks)}: split, a shared backbone with one DeepLabV3 head per task; mtan, "
        f"task attention on a shared dilated backbone; classifier, pooled features and an MLP per task "
        f"(default {spec.networks[0]})",
    )
    add(
        "--backbone",
        dest="model.backbone",
        default=None,
        help=f"the shared trunk: {', '.join(sorted(BACKBONES))} (a bare depth such as 50 works too; "
        "default resnet50, the paper's; resnet18 with --synthetic)",
    )
    add(
        "--base_width",
        dest="model.base_width",
        type=int,
        default=None,
        help="the backbone's base width (64: the real ResNets and Swin-T, whose embedding is 1.5x it; 16 with --synthetic)",
    )
    add(
        "--stage_sizes",
        dest="model.stage_sizes",
        type=_ints,
        default=None,
        metavar="N,N,N,N",
        help="blocks per backbone stage (default: the real network's; 1,2,1,1 with --synthetic)",
    )
    add(
        "--head_width",
        dest="model.head_width",
        type=int,
        default=None,
        help="the DeepLabV3 heads' width (256: the real heads; 32 with --synthetic)",
    )
    add(
        "--classifier_hidden",
        dest="model.classifier_hidden",
        type=int,
        default=None,
        help="the classifier heads' hidden width (Linear-ReLU-Linear on the pooled features); 0: "
        "one Linear layer, torchvision's fc (default "
        f"{spec.model_recipe.get('classifier_hidden', 64)}; classifier network only)",
    )
    add(
        "--weighting",
        dest="method.name",
        choices=sorted(methods.METHODS),
        default=None,
        help="multi-task weighting method (default equal)",
    )
    add(
        "--method_args",
        dest="method.args",
        default=None,
        metavar="KEY=VALUE,...",
        help="hyper-parameters of the weighting method (defaults: the original code's): "
        + "; ".join(
            f"{name}: "
            + (", ".join(f"{k}={v}" for k, v in methods.method_arguments(name).items()) or "none")
            for name in sorted(methods.METHODS)
        )
        + ". Kendall et al.'s uncertainty form: scale=1,initial_log_var=0,weight_decay=false",
    )
    add(
        "--dgr_weight",
        dest="dgr.weight",
        type=float,
        default=None,
        help="lambda, the DGR penalty's weight; 0 turns DGR off (default 0; 0.1 with --synthetic; "
        "--regularizer dgr only)",
    )
    add(
        "--num_dummy",
        dest="dgr.num_dummy",
        type=int,
        default=None,
        help="K, dummy head sets for DGR (default 3)",
    )
    add(
        "--dgr_method",
        dest="dgr.estimator",
        choices=DGR_ESTIMATORS,
        default=None,
        help="how the penalty's gradient is computed: exact (forward-over-reverse, default), "
        "double_backprop (reference), finite_difference (the paper's estimator at the feature "
        "level), paper (the original algorithm through the whole model; with --squared_norm --num_dummy 1 "
        "it is the original code's update)",
    )
    add(
        "--fd_eps",
        dest="dgr.fd_eps",
        type=float,
        default=None,
        help="finite-difference step for finite_difference / paper (default 1e-3)",
    )
    add(
        "--squared_norm",
        dest="dgr.squared",
        action="store_const",
        const=True,
        default=None,
        help="penalise ||g||^2 (the original code's objective) instead of ||g|| (the paper's "
        "text). The original code's update: --dgr_method paper --squared_norm --num_dummy 1",
    )
    add(
        "--regularizer",
        dest="regularizer.name",
        choices=tuple(config_lib.REGULARIZERS),
        default=None,
        help="the regulariser beside the MTL method (the paper's Fig. 2 compares them; every "
        "one combines with every --weighting): "
        + "; ".join(spec.help for spec in config_lib.REGULARIZERS.values())
        + ". Every regulariser but dgr turns DGR off; --dgr_weight with it is an error",
    )
    add(
        "--sam_rho",
        dest="regularizer.sam_rho",
        type=float,
        metavar="RHO",
        default=None,
        help=f"SAM's neighbourhood radius rho (default {regularizers.DEFAULT_SAM_RHO:g}, "
        "Foret et al.'s; --regularizer sam only)",
    )
    add(
        "--pta_decoders",
        dest="regularizer.pta_decoders",
        type=int,
        metavar="D",
        default=None,
        help=f"PTA's decoders per task, each a full copy of the task's head, independently "
        f"initialised (default {pta.DEFAULT_DECODERS}; --regularizer pta only)",
    )
    add(
        "--tasks",
        dest="tasks.names",
        default=None,
        help=f"comma-separated subset of {','.join(t.name for t in spec.tasks)}; "
        "one task gives the single-task baseline (default: all)",
    )
    add(
        "--epochs",
        dest="train.epochs",
        type=int,
        default=None,
        help=f"training epochs (default {recipe['epochs']}; 8 with --synthetic)",
    )
    add(
        "--steps",
        dest="train.steps",
        type=int,
        default=None,
        help="stop after this many steps (overrides --epochs)",
    )
    add(
        "--batch_size",
        dest="train.batch_size",
        type=int,
        default=None,
        help=f"global batch size (default {recipe['batch_size']})",
    )
    add(
        "--lr",
        dest="train.lr",
        type=float,
        default=None,
        help=f"learning rate (default {recipe['lr']})",
    )
    add(
        "--optimizer",
        dest="train.optimizer",
        choices=config_lib.OPTIMIZERS,
        default=None,
        help=f"sgd: momentum 0.9, cosine schedule; adam (default {recipe['optimizer']}, the paper's for "
        f"{spec.name})",
    )
    add(
        "--weight_decay",
        dest="train.weight_decay",
        type=float,
        default=None,
        help=f"L2 weight decay of the trained parameters (default {recipe['weight_decay']:g})",
    )
    add(
        "--eval_every",
        dest="train.eval_every",
        type=int,
        default=None,
        help="evaluate every N epochs (default 1)",
    )
    add(
        "--data_dir",
        dest="data.data_dir",
        default=None,
        help=f"where the data is: {spec.data_help}",
    )
    add(
        "--synthetic",
        dest="data.synthetic",
        action="store_const",
        const=True,
        default=None,
        help="train on built-in data instead"
        + (f" ({spec.synthetic_help})" if spec.has_synthetic else "")
        + ", with a CPU-sized preset: ResNet-18 with reduced widths, 8 epochs, DGR on "
        "(lambda 0.1); flags given explicitly still win",
    )
    add(
        "--synthetic_size",
        dest="data.synthetic_size",
        type=_size,
        default=None,
        metavar="HxW",
        help="image size of the built-in data (default 96x128)",
    )
    add(
        "--synthetic_counts",
        dest="data.synthetic_counts",
        type=_ints,
        default=None,
        metavar="TRAIN,VAL",
        help="examples of the built-in data (default 64,16)",
    )
    add(
        "--reference",
        default=None,
        metavar="JSON",
        help="single-task metrics for delta_m, e.g. from your own single-task runs' summary.json "
        "(default: the paper's)",
    )
    add(
        "--seed",
        dest="train.seed",
        type=int,
        default=None,
        help="seed for initialisation and data order (default 0)",
    )
    add(
        "--workdir",
        default=None,
        help=f"where checkpoints, metrics and reports go (default runs/{spec.name})",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its newest good checkpoint",
    )
    add(
        "--overwrite",
        action="store_true",
        help="start afresh in a --workdir that holds a run, removing it",
    )
    add(
        "--checkpoint_every",
        dest="train.checkpoint_every",
        type=int,
        default=None,
        help="save every N steps as well as at every epoch end (default 0: epoch ends only)",
    )
    add(
        "--num_devices",
        dest="train.num_devices",
        type=int,
        default=None,
        help="devices on the data-parallel mesh (default all)",
    )
    add(
        "--pretrained",
        dest="train.pretrained",
        default=None,
        metavar="PATH",
        help="start the backbone from an ImageNet-pretrained checkpoint you downloaded: "
        "torchvision's resnet18/34/50/101 or swin_t weights as .safetensors, .npz, or .pth/.pt "
        "(those need torch; python -m experiments.convert_weights converts them once); the "
        "paper starts from torchvision's ResNet-50 (default: random initialisation)",
    )
    add("--no_progress", action="store_true", help="no progress bar (log lines only)")
    add(
        "--dry_run",
        action="store_true",
        help="build the model on abstract shapes (no large allocation; full size unless --synthetic or size "
        "flags shrink it), print a summary and a JSON line of parameter counts, and exit",
    )
    conventions = parser.add_argument_group(
        "conventions",
        "Defaults train what the original code (the DGR repository on auto-lambda) trains; "
        "the alternatives are dgr_jax's own choices (README, Fidelity)",
    )
    group = conventions.add_argument
    group(
        "--normal_loss",
        dest="tasks.normal_loss",
        choices=config_lib.NORMAL_LOSSES,
        default=None,
        help="surface-normal loss: l1, the L1 distance between unit normals summed over "
        "channels, mean over valid pixels (the original's, default); cosine, 1 - cos",
    )
    group(
        "--head_dropout",
        dest="model.dropout_rate",
        type=float,
        default=None,
        help="dropout after the DeepLabV3 heads' ASPP projection (default 0, the original's; "
        "torchvision's DeepLabHead uses 0.5)",
    )
    group(
        "--bn_running_var",
        dest="model.bn_unbiased_running_var",
        choices=("unbiased", "biased"),
        default=None,
        help="BatchNorm running-variance update: unbiased n/(n-1), PyTorch's and the "
        "original's (default); biased, Flax's",
    )
    group(
        "--resize_rule",
        dest="data.resize_rule",
        choices=config_lib.RESIZE_RULES,
        default=None,
        help="augmentation resizing of labels, depth and normals: legacy, PyTorch's nearest "
        "(floor rule) with truncated sizes, the original's (default); half_pixel, nearest "
        "with half-pixel centres and rounded sizes",
    )
    group(
        "--drop_last",
        dest="data.drop_last",
        action="store_const",
        const=True,
        default=None,
        help="drop a short last training batch (the original keeps it; several processes always drop it)",
    )
    group(
        "--lr_schedule",
        dest="train.lr_schedule",
        choices=config_lib.LR_SCHEDULES,
        default=None,
        help="SGD's cosine schedule stepped once per epoch, as the original's "
        "CosineAnnealingLR (default), or every step",
    )
    return parser


def _fail(spec: DatasetSpec, message: str):
    sys.exit(f"{spec.command}: {message}")


def parse_method_args(method: str, text: str) -> tuple[tuple[str, object], ...]:
    """``"a=1,b=false"`` -> ``(("a", 1.0), ("b", False))``, each value converted to the
    type of the argument's default; ConfigError (field ``args``) for bad items."""
    known = methods.method_arguments(method)
    parsed = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ConfigError("MethodConfig", "args", f"{item!r} is not KEY=VALUE")
        if key not in known:
            listing = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            raise ConfigError(
                "MethodConfig",
                "args",
                f"{method} has no argument {key!r}; its arguments: {listing}",
            )
        default = known[key]
        try:
            if isinstance(default, str):
                converted = value
            elif isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                converted = value.lower() in ("true", "1")
            else:
                converted = int(value) if isinstance(default, int) else float(value)
        except ValueError:
            raise ConfigError(
                "MethodConfig", "args", f"{key}={value!r} is not a {type(default).__name__}"
            ) from None
        parsed.append((key, converted))
    return tuple(parsed)


def _read_reference(spec: DatasetSpec, text: str) -> dict:
    path = Path(text)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _fail(spec, f"--reference {path}: cannot read JSON ({error})")
    reference = loaded.get("metrics", loaded) if isinstance(loaded, dict) else None
    if not isinstance(reference, dict):
        _fail(spec, f"--reference {path}: expected a JSON object of metrics")
    return reference


def build_config(spec: DatasetSpec, args) -> RunConfig:
    """Flags -> ``RunConfig`` (defaults < recipe < CPU preset < flags); one line per error."""
    records = {
        "model": {"network": spec.networks[0], **spec.model_recipe},
        "dgr": {},
        "method": {},
        "train": dict(spec.recipe),
        "data": {},
        "tasks": {},
        "regularizer": {},
    }
    flags = {path: value for path, value in vars(args).items() if "." in path and value is not None}
    if flags.get("data.synthetic"):
        for record, values in CPU_PRESET.items():
            records[record].update(values)
    for path, value in flags.items():
        record, field = path.split(".", 1)
        records[record][field] = value
    _apply_regularizer(spec, flags, records)
    try:
        model = records["model"]
        if "bn_unbiased_running_var" in model and isinstance(model["bn_unbiased_running_var"], str):
            model["bn_unbiased_running_var"] = model["bn_unbiased_running_var"] == "unbiased"
        if isinstance(records["tasks"].get("names"), str):
            records["tasks"]["names"] = tuple(
                t.strip() for t in records["tasks"]["names"].split(",") if t.strip()
            )
        if isinstance(records["method"].get("args"), str):
            records["method"]["args"] = parse_method_args(
                records["method"].get("name", "equal"), records["method"]["args"]
            )
        if records["data"].get("data_dir") is not None:
            records["data"]["data_dir"] = str(Path(records["data"]["data_dir"]).expanduser())
        config = RunConfig(
            dataset=spec.name,
            model=ModelConfig(**model),
            dgr=DGRConfig(**records["dgr"]),
            method=MethodConfig(**records["method"]),
            train=TrainConfig(**records["train"]),
            data=DataConfig(**records["data"]),
            tasks=TaskConfig(**records["tasks"]),
            regularizer=RegularizerConfig(**records["regularizer"]),
            reference=None if args.reference is None else _read_reference(spec, args.reference),
        )
    except ConfigError as error:
        flag, message = describe_field(field_path(error)), error.message
        _fail(
            spec,
            f"{flag} {message}" if message.startswith(("must", "and ")) else f"{flag}: {message}",
        )
    if not args.dry_run:
        _check_data_dir(spec, config)
    return config


def _apply_regularizer(spec: DatasetSpec, flags: dict, records: dict) -> None:
    """A regulariser other than dgr turns DGR off (the --synthetic preset's lambda too);
    a flag it does not read is an error, as --dgr_weight is."""
    name = flags.get("regularizer.name", RegularizerConfig.name)
    regularizer = config_lib.REGULARIZERS.get(name)
    if regularizer is None:  # RegularizerConfig names the choices
        return
    given = [path.split(".", 1)[1] for path in flags if path.startswith("regularizer.")]
    for field in given:
        if field != "name" and field not in regularizer.fields:
            owner = next(n for n, r in config_lib.REGULARIZERS.items() if field in r.fields)
            _fail(
                spec,
                f"{describe_field('regularizer.' + field)} applies to --regularizer {owner} "
                f"only, not {name}",
            )
    if not regularizer.dgr:
        if "dgr.weight" in flags:
            _fail(spec, f"--dgr_weight applies to --regularizer dgr only; {name} turns DGR off")
        records["dgr"]["weight"] = 0.0


def _check_data_dir(spec: DatasetSpec, config: RunConfig) -> None:
    data = config.data
    if not spec.needs_data_dir:
        if data.data_dir is not None:
            _fail(spec, f"--data_dir: {spec.name} reads no folder ({spec.data_help})")
        return
    if data.synthetic:
        return
    if data.data_dir is None:
        _fail(
            spec,
            f"no data: pass --data_dir DIR with {spec.data_help}, or --synthetic to run on built-in data",
        )
    if not Path(data.data_dir).is_dir():
        _fail(
            spec,
            f"--data_dir {data.data_dir}: no such folder (expected {spec.data_help}); "
            "or use --synthetic to run on built-in data",
        )


def run(dataset: str, argv=None):
    spec = DATASETS[dataset]
    args = make_parser(spec).parse_args(argv)
    parallel.initialize_distributed()  # before any other JAX call
    import absl.logging

    absl.logging.set_verbosity(
        absl.logging.ERROR
    )  # TFDS announces every custom builder config otherwise
    config = build_config(spec, args)
    if args.dry_run:
        from experiments.dry_run import dry_run

        return dry_run(config)
    from experiments.loop import RunError, Stopped, train_and_evaluate

    workdir = Path(args.workdir or f"runs/{spec.name}").expanduser()
    start = time.perf_counter()
    try:
        summary = train_and_evaluate(
            config,
            workdir,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except Stopped as stop:
        print(f"{spec.command}: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the newest finished checkpoint stays
        print(
            f"{spec.command}: interrupted; the newest finished checkpoint in {workdir} is kept",
            file=sys.stderr,
        )
        sys.exit(130)
    except (
        RunError,
        CheckpointError,
        DataError,
        ValueError,
        FloatingPointError,
        FileNotFoundError,
    ) as error:
        _fail(spec, " ".join(str(error).split()))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return summary
