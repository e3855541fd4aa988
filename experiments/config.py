"""One frozen configuration tree for a run, validated where each value lives.

``RunConfig`` holds the library's own records (``models.ModelConfig``,
``objective.DGRConfig``) beside the run's (``MethodConfig``, ``TrainConfig``,
``DataConfig``, ``TaskConfig``, ``RegularizerConfig``: the regulariser beside the MTL
method, one record of ``REGULARIZERS`` per name). Each record checks its own fields in ``__post_init__``
and raises ``dgr_jax.errors.ConfigError`` naming the field; ``RunConfig`` checks what
depends on the data set or on two records (its tasks, networks, method arguments; DGR
off under another regulariser). Nothing else validates
a value, and the command line maps a ``ConfigError``'s field to its flag (``cli.FLAGS``).

Build one with ``RunConfig(dataset=..., model=ModelConfig(...), ...)`` or change one with
``RunConfig.replace(train={"steps": 2}, dgr={"weight": 0.1})``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

from dgr_jax import methods, pta, regularizers
from dgr_jax.errors import ConfigError
from dgr_jax.models import ModelConfig
from dgr_jax.objective import DGRConfig
from dgr_jax.tasks import Task
from experiments import datasets

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("epoch", "step")
RESIZE_RULES = ("legacy", "half_pixel")
NORMAL_LOSSES = ("l1", "cosine")


def _at_least(owner: str, record, low: int, *names: str) -> None:
    for name in names:
        value = getattr(record, name)
        if value is not None and value < low:
            raise ConfigError(owner, name, f"must be >= {low}, got {value}")


def _one_of(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(
            owner, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The MTL method (``dgr_jax.methods``) and its hyper-parameters (defaults: its paper's)."""

    name: str = "equal"
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        _one_of("MethodConfig", "name", self.name, tuple(methods.METHODS))
        try:
            self.build()
        except ValueError as error:
            raise ConfigError("MethodConfig", "args", str(error)) from None

    def build(self) -> methods.MTLMethod:
        return methods.get_method(self.name, **dict(self.args))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the run's schedule. SGD: momentum 0.9; ``weight_decay`` on the
    trained parameters; ``lr_schedule`` "epoch" steps the cosine once per epoch (the
    original's ``CosineAnnealingLR``), "step" every step. ``steps`` overrides ``epochs``."""

    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 1e-4
    lr_schedule: str = "epoch"
    batch_size: int = 4
    epochs: int = 200
    steps: int | None = None
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    num_devices: int | None = None
    # A torchvision / timm checkpoint of the backbone (ImageNet-pretrained) to start from.
    pretrained: str | None = None

    def __post_init__(self):
        _one_of("TrainConfig", "optimizer", self.optimizer, OPTIMIZERS)
        _one_of("TrainConfig", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not self.lr > 0:
            raise ConfigError("TrainConfig", "lr", f"must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(
                "TrainConfig", "weight_decay", f"must be >= 0, got {self.weight_decay}"
            )
        _at_least(
            "TrainConfig", self, 1, "batch_size", "epochs", "steps", "eval_every", "num_devices"
        )
        _at_least("TrainConfig", self, 0, "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is fed. ``synthetic``: built-in data of
    ``synthetic_size`` with ``synthetic_counts`` (train, val) examples. ``resize_rule``:
    the augmentation's resizing (``data_pipelines.scenes.Augmentation``). ``drop_last``:
    drop a short last training batch (the original keeps it)."""

    data_dir: str | None = None
    synthetic: bool = False
    synthetic_size: tuple[int, int] = (96, 128)
    synthetic_counts: tuple[int, int] = (64, 16)
    resize_rule: str = "legacy"
    drop_last: bool = False

    def __post_init__(self):
        _one_of("DataConfig", "resize_rule", self.resize_rule, RESIZE_RULES)
        for name in ("synthetic_size", "synthetic_counts"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ConfigError("DataConfig", name, f"must be two numbers >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which of the data set's tasks to train (None: all; one: the single-task baseline)
    and the loss options of their kinds."""

    names: tuple[str, ...] | None = None
    normal_loss: str = "l1"

    def __post_init__(self):
        _one_of("TaskConfig", "normal_loss", self.normal_loss, NORMAL_LOSSES)
        if self.names is not None and not self.names:
            raise ConfigError("TaskConfig", "names", "must name at least one task")


class RegularizerSpec(NamedTuple):
    """One regulariser of ``--regularizer``: ``help`` for the flag; ``dgr``: DGR's penalty
    applies (``--dgr_weight``; every other regulariser turns DGR off); ``fields``: the
    ``RegularizerConfig`` fields it reads; ``build(config) -> dgr_jax Regularizer``."""

    help: str
    dgr: bool
    fields: tuple[str, ...]
    build: Callable[["RegularizerConfig"], regularizers.Regularizer]


# Adding a regulariser is one record here (and its library part in dgr_jax).
REGULARIZERS: dict[str, RegularizerSpec] = {
    "none": RegularizerSpec(
        "none: the MTL method alone (DGR off, the --synthetic preset's too)",
        False,
        (),
        lambda c: regularizers.NONE,
    ),
    "dgr": RegularizerSpec(
        "dgr: DGR's penalty, on when --dgr_weight > 0 (the default)",
        True,
        (),
        lambda c: regularizers.NONE,
    ),
    "sam": RegularizerSpec(
        "sam: sharpness-aware minimisation, the step's gradient taken at w + rho g/||g|| "
        "(Foret et al. 2021; --sam_rho)",
        False,
        ("sam_rho",),
        lambda c: regularizers.sam(c.sam_rho),
    ),
    "pta": RegularizerSpec(
        "pta: pseudo-task augmentation, --pta_decoders trained decoders per task on the "
        "shared encoder, each task's loss their mean, predictions from the decoder of lowest "
        "running training loss (Meyerson & Miikkulainen 2018)",
        False,
        ("pta_decoders",),
        lambda c: regularizers.pta(c.pta_decoders),
    ),
}


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    """The regulariser beside the MTL method (``REGULARIZERS``; the paper's Fig. 2 compares
    DGR with SAM and PTA). ``sam_rho``: SAM's radius (Foret et al.'s 0.05);
    ``pta_decoders``: PTA's decoders per task."""

    name: str = "dgr"
    sam_rho: float = regularizers.DEFAULT_SAM_RHO
    pta_decoders: int = pta.DEFAULT_DECODERS

    def __post_init__(self):
        _one_of("RegularizerConfig", "name", self.name, tuple(REGULARIZERS))
        if not self.sam_rho > 0:
            raise ConfigError("RegularizerConfig", "sam_rho", f"must be > 0, got {self.sam_rho}")
        _at_least("RegularizerConfig", self, 1, "pta_decoders")

    @property
    def spec(self) -> RegularizerSpec:
        return REGULARIZERS[self.name]

    def build(self) -> regularizers.Regularizer:
        return self.spec.build(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Defaults are the paper's NYUv2 recipe."""

    dataset: str = "nyuv2"
    model: ModelConfig = ModelConfig()
    dgr: DGRConfig = DGRConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    tasks: TaskConfig = TaskConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    reference: Mapping[str, float] | None = (
        None  # single-task metrics for Δm; None: the data set's default
    )

    def __post_init__(self):
        _one_of("RunConfig", "dataset", self.dataset, tuple(datasets.DATASETS))
        spec = self.spec
        _one_of("ModelConfig", "network", self.model.network, spec.networks)
        if self.model.network == "mtan" and self.method.build().level == "representation":
            raise ConfigError(
                "MethodConfig",
                "name",
                f"{self.method.name} combines gradients of one shared representation, and "
                "mtan's features are per task; use --network split "
                "(or, for mgda, --method_args level=parameters)",
            )
        if self.dgr.on and not self.regularizer.spec.dgr:
            raise ConfigError(
                "DGRConfig",
                "weight",
                f"applies to --regularizer dgr only; --regularizer {self.regularizer.name} "
                "turns DGR off",
            )
        if self.tasks.names is not None:
            available = [t.name for t in spec.tasks]
            unknown = [t for t in self.tasks.names if t not in available]
            if unknown:
                raise ConfigError(
                    "TaskConfig",
                    "names",
                    f"{', '.join(unknown)} is not a task of {self.dataset}; "
                    f"choose from {', '.join(available)}",
                )

    @property
    def spec(self) -> datasets.DatasetSpec:
        return datasets.DATASETS[self.dataset]

    def task_records(self) -> tuple[Task, ...]:
        chosen = [
            t for t in self.spec.tasks if self.tasks.names is None or t.name in self.tasks.names
        ]
        return tuple(
            dataclasses.replace(t, loss_name=self.tasks.normal_loss) if t.kind == "normal" else t
            for t in chosen
        )

    def build_network(self):
        """The run's ``MultiTaskNet``: ``model`` on its tasks, with its regulariser's heads
        (PTA's decoders); what its train state and checkpoints are made of."""
        from dgr_jax.models import build_model

        return self.regularizer.build().network(build_model(self.model, self.task_records()))

    def replace(self, **changes) -> "RunConfig":
        """``replace(train={"steps": 2})``: a dict changes fields of that record; any other
        value replaces the field."""
        updated = {}
        for name, value in changes.items():
            current = getattr(self, name)
            updated[name] = (
                dataclasses.replace(current, **value)
                if isinstance(value, dict) and dataclasses.is_dataclass(current)
                else value
            )
        return dataclasses.replace(self, **updated)

    def as_dict(self) -> dict:
        """JSON-able: tuples as lists, the tree as nested dicts."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, tree: Mapping) -> "RunConfig":
        """The inverse of ``as_dict``: a saved run's configuration (its
        ``summary.json["config"]``, or a checkpoint's) as a ``RunConfig``, so that analyses
        rebuild the run's network and data from its workdir alone. Lists become tuples
        again; a field missing from ``tree`` takes its default; every record validates
        itself as when built by hand. An unknown field is a ``ValueError`` naming it."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(tree) - set(defaults))
        if unknown:
            raise ValueError(f"RunConfig has no field {unknown[0]!r}")
        values = {}
        for name, value in tree.items():
            record = defaults[name]
            if dataclasses.is_dataclass(record) and isinstance(value, Mapping):
                known = {f.name for f in dataclasses.fields(record)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"{type(record).__name__} has no field {unknown[0]!r}")
                values[name] = type(record)(**{k: _tupled(v) for k, v in value.items()})
            else:
                values[name] = value if isinstance(value, Mapping) else _tupled(value)
        return cls(**values)


def _tupled(value):
    """JSON lists back to the tuples the records hold (nested: ``method.args`` pairs)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


def record_defaults() -> dict:
    """The flattened JSON-able defaults of ``RunConfig``'s records (``{"regularizer.name":
    "dgr", ...}``): what a field that a saved configuration predates had."""
    return flatten(
        {
            f.name: _jsonable(dataclasses.asdict(f.default))
            for f in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(f.default)
        }
    )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# The command line's flag for each configuration field (``cli`` builds the tree from
# them; errors and resume checks name fields by their flags).
FIELD_FLAGS = {
    "dataset": None,
    "model.network": "--network",
    "model.backbone": "--backbone",
    "model.base_width": "--base_width",
    "model.stage_sizes": "--stage_sizes",
    "model.head_width": "--head_width",
    "model.dropout_rate": "--head_dropout",
    "model.bn_unbiased_running_var": "--bn_running_var",
    "model.dilated": None,
    "model.aspp_rates": None,
    "model.classifier_hidden": "--classifier_hidden",
    "dgr.weight": "--dgr_weight",
    "dgr.num_dummy": "--num_dummy",
    "dgr.estimator": "--dgr_method",
    "dgr.squared": "--squared_norm",
    "dgr.fd_eps": "--fd_eps",
    "dgr.unroll_sets": None,
    "method.name": "--weighting",
    "method.args": "--method_args",
    "train.optimizer": "--optimizer",
    "train.lr": "--lr",
    "train.weight_decay": "--weight_decay",
    "train.lr_schedule": "--lr_schedule",
    "train.batch_size": "--batch_size",
    "train.epochs": "--epochs",
    "train.steps": "--steps",
    "train.seed": "--seed",
    "train.eval_every": "--eval_every",
    "train.checkpoint_every": "--checkpoint_every",
    "train.num_devices": "--num_devices",
    "train.pretrained": "--pretrained",
    "data.data_dir": "--data_dir",
    "data.synthetic": "--synthetic",
    "data.synthetic_size": "--synthetic_size",
    "data.synthetic_counts": "--synthetic_counts",
    "data.resize_rule": "--resize_rule",
    "data.drop_last": "--drop_last",
    "tasks.names": "--tasks",
    "tasks.normal_loss": "--normal_loss",
    "regularizer.name": "--regularizer",
    "regularizer.sam_rho": "--sam_rho",
    "regularizer.pta_decoders": "--pta_decoders",
    "reference": "--reference",
}
OWNERS = {
    "ModelConfig": "model",
    "DGRConfig": "dgr",
    "MethodConfig": "method",
    "TrainConfig": "train",
    "DataConfig": "data",
    "TaskConfig": "tasks",
    "RegularizerConfig": "regularizer",
    "RunConfig": None,
}

# Fields a resumed run may change: they do not alter the trained state or the data order.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.steps",
    "train.checkpoint_every",
    "train.eval_every",
    "train.num_devices",
    "train.pretrained",  # read at a run's start only: a resumed run's weights are its own
    "data.data_dir",
    "reference",
)


def field_path(error: ConfigError) -> str:
    owner = OWNERS.get(error.owner)
    return f"{owner}.{error.field}" if owner else error.field


def describe_field(path: str) -> str:
    """``"model.network"`` -> ``"--network"``; a field without a flag keeps its path."""
    return FIELD_FLAGS.get(path) or path


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """``{"model": {"network": "split"}}`` -> ``{"model.network": "split"}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path != "reference":
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat
