"""One registered spec per data set: its tasks, networks, recipe, data, paper references.

A ``DatasetSpec`` is all that the run loop, the command line and the reports know about
a data set; adding one is one ``register(DatasetSpec(...))`` here and one pipeline in
``data_pipelines``. ``spec.open(config)`` checks the data folder (or builds the built-in
data) once and returns ``Data``: epochs of training batches and the evaluation set, in
this process's shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax

from dgr_jax import paper_tables
from dgr_jax import tasks as task_lib


@dataclasses.dataclass
class Data:
    train_epoch: Callable[[int, int], Any]  # (epoch, start_step) -> sized iterable of numpy batches
    evaluation: Callable[[], Iterable]
    description: str
    # (epoch, start_step) -> the training set in another order, batch for batch as long as
    # train_epoch's: the held-out batches of a method that looks ahead (Auto-lambda's
    # second shuffle of the training set)
    heldout_epoch: Callable[[int, int], Any] | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple[task_lib.Task, ...]
    image_size: tuple[int, int]  # of the real data
    networks: tuple[str, ...]  # ModelConfig.network values; the first is the default
    recipe: Mapping[str, Any]  # the paper's TrainConfig fields
    data_help: str  # what --data_dir holds
    open_source: Callable[
        [Any, bool], tuple[Any, str]
    ]  # (config, verbose) -> (source, description)
    eval_split: str = "val"
    needs_data_dir: bool = True
    has_synthetic: bool = True
    paper_reference: Mapping[str, float] | None = (
        None  # the paper's single-task metrics (None: no table)
    )
    paper_by_network: bool = True  # the paper's table has a column group per network
    synthetic_help: str = "procedural scenes, 96x128"  # what --synthetic generates
    # the paper's ModelConfig fields for this data set (over ModelConfig's defaults)
    model_recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def command(self) -> str:
        return f"experiments.{self.name}"

    def paper_rows(self, network: str) -> dict:
        """The paper's table rows for this data set and network ({} when it has none)."""
        if self.name not in paper_tables.TABLES:
            return {}
        return paper_tables.paper_rows(self.name, network if self.paper_by_network else None)

    def open(self, config, *, verbose: bool = True) -> Data:
        """The data of ``config`` (folder checked and prepared once, or built-in data)."""
        process_index, process_count = jax.process_index(), jax.process_count()
        batch = config.train.batch_size
        if batch % process_count:
            raise ValueError(
                f"--batch_size {batch} is not divisible by the {process_count} processes"
            )
        local = batch // process_count
        shard = dict(process_index=process_index, process_count=process_count)
        # A short last batch is kept, as the original's data loader keeps it; several
        # processes drop it, since their shards (which differ by up to one example) would
        # otherwise end the epoch with different batch counts.
        drop_last = config.data.drop_last or process_count > 1
        source, description = self.open_source(config, verbose)

        def train_epoch(epoch, start_step, seed=config.train.seed):
            return source.dataset(
                "train",
                local,
                seed=seed,
                epoch=epoch,
                start_step=start_step,
                drop_remainder=drop_last,
                **shard,
            )

        def heldout_epoch(epoch, start_step):
            return train_epoch(epoch, start_step, seed=config.train.seed + HELDOUT_SEED_OFFSET)

        def evaluation():
            return source.dataset(self.eval_split, local, **shard)

        return Data(train_epoch, evaluation, description, heldout_epoch)


HELDOUT_SEED_OFFSET = 7919  # the held-out pass's shuffle seed is the run's seed plus this

DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"data set {spec.name!r} is registered twice")
    DATASETS[spec.name] = spec
    return spec


# ---------------------------------------------------------------------------
# The built-in and community data sets


def _scene_source(name: str):
    def open_source(config, verbose):
        from data_pipelines import cityscapes, nyuv2, synthetic

        module = nyuv2 if name == "nyuv2" else cityscapes
        if config.data.synthetic:
            height, width = config.data.synthetic_size
            root = synthetic.synthetic_root(
                name,
                num_train=config.data.synthetic_counts[0],
                num_val=config.data.synthetic_counts[1],
                height=height,
                width=width,
                seed=0,
            )
            description = f"built-in procedural scenes in the {name} format ({root})"
        else:
            root, description = Path(config.data.data_dir), f"{name} from {config.data.data_dir}"
        augmentation = dataclasses.replace(
            module.FORMAT.augmentation, resize_rule=config.data.resize_rule
        )
        return module.open_source(root, verbose=verbose, augmentation=augmentation), description

    return open_source


def _pascal_source(config, verbose):
    from data_pipelines import pascal, pascal_synthetic

    if config.data.synthetic:
        height, width = config.data.synthetic_size
        train, val = config.data.synthetic_counts
        root = pascal_synthetic.synthetic_root(train, val, height, width, seed=0)
        description = f"built-in generated images in the PASCAL-MT layout ({root})"
        crop = max(height, width)
    else:
        root, description = Path(config.data.data_dir), f"pascal from {config.data.data_dir}"
        crop = pascal.CROP
    return pascal.PascalSource(root, crop=crop, verbose=verbose), description


def _utkface_source(config, verbose):
    from data_pipelines import utkface

    if config.data.synthetic:
        root = _fake_utkface_root(utkface, sum(config.data.synthetic_counts) * 4)
        description = f"built-in generated faces in the UTKFace layout ({root})"
    else:
        root, description = Path(config.data.data_dir), f"UTKFace from {config.data.data_dir}"
    return utkface.open_source(root), description


def _fake_utkface_root(utkface, count: int) -> Path:
    from data_pipelines.common import cache_root, write_once

    root = cache_root() / "synthetic" / f"utkface_fake_{count}"
    return write_once(root, lambda folder: utkface.write_fake_utkface(folder, count, seed=0))


def _multidigits_source(config, verbose):
    from data_pipelines import multidigits

    del verbose
    return multidigits.open_source(None), "MultiDigits (pairs of scikit-learn's handwritten digits)"


SCENE_RECIPE = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=4, epochs=200)

register(
    DatasetSpec(
        "nyuv2",
        task_lib.NYUV2,
        (288, 384),
        ("split", "mtan"),
        SCENE_RECIPE,
        "the NYUv2 .npy folders: DIR/{train,val}/{image,label,depth,normal}/{i}.npy (see data_pipelines/nyuv2.py)",
        _scene_source("nyuv2"),
        paper_reference=paper_tables.PAPER_SINGLE_TASK["nyuv2"],
    )
)
register(
    DatasetSpec(
        "cityscapes",
        task_lib.CITYSCAPES,
        (256, 512),
        ("split", "mtan"),
        SCENE_RECIPE,
        "the Cityscapes .npy folders: DIR/{train,val}/{image,label_19,part_seg,depth}/{i}.npy "
        "(see data_pipelines/cityscapes.py)",
        _scene_source("cityscapes"),
        paper_reference=paper_tables.PAPER_SINGLE_TASK["cityscapes"],
    )
)
register(
    DatasetSpec(
        "pascal",
        task_lib.PASCAL_CONTEXT,
        (512, 512),
        ("split", "mtan"),
        # The MTL survey's / MTI-Net's PASCAL recipe (SGD, momentum 0.9); their poly
        # schedule is our cosine here.
        dict(optimizer="sgd", lr=0.005, weight_decay=1e-4, batch_size=8, epochs=100),
        "the PASCAL_MT folder of ASTMT / MTI-Net: ImageSets/Context, JPEGImages, semseg, "
        "human_parts, sal_distill, normals_distill, pascal-context/trainval (see data_pipelines/pascal.py)",
        _pascal_source,
        synthetic_help="people with their parts and objects written as PASCAL-MT files, up to 96x128",
    )
)
register(
    DatasetSpec(
        "utkface",
        task_lib.UTKFACE,
        (64, 64),
        ("classifier",),
        dict(optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64, epochs=100),
        "a folder of UTKFace age_gender_race_date*.jpg files",
        _utkface_source,
        eval_split="test",
        synthetic_help="generated faces written as UTKFace JPEGs",
        paper_reference=paper_tables.PAPER_SINGLE_TASK["utkface"],
        paper_by_network=False,
    )
)
register(
    DatasetSpec(
        "multidigits",
        task_lib.MULTIDIGITS,
        (12, 24),
        ("classifier",),
        dict(optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64, epochs=20),
        "nothing: MultiDigits is built from scikit-learn's bundled digits",
        _multidigits_source,
        eval_split="test",
        needs_data_dir=False,
        has_synthetic=False,
    )
)


# ---------------------------------------------------------------------------
# ImageNet: single-task classification (the paper's Table 4(a), last row)


def _imagenet_source(config, verbose):
    from data_pipelines import imagenet

    if config.data.synthetic:
        height, width = config.data.synthetic_size
        train, val = config.data.synthetic_counts
        root = _fake_imagenet_root(imagenet, train, val, height, width)
        # The fake JPEGs' shorter side plays the real set's 256: crops of 7/8 of it.
        size = max(1, min(height, width) * 224 // 256)
        description = f"built-in generated images in the ILSVRC2012 archive format, {size}x{size} crops ({root})"
    else:
        root, size = Path(config.data.data_dir), config.spec.image_size[0]
        description = f"ImageNet from {config.data.data_dir}"
    return imagenet.open_source(root, image_size=size, verbose=verbose), description


def _fake_imagenet_root(imagenet, num_train: int, num_val: int, height: int, width: int) -> Path:
    """Tiny ILSVRC2012 archives (``imagenet.write_fake_imagenet``), written once per size
    under ``cache_root()/synthetic``."""
    from data_pipelines.common import cache_root, write_once

    root = cache_root() / "synthetic" / f"imagenet_fake_{num_train}_{num_val}_{height}x{width}"
    return write_once(
        root,
        lambda folder: imagenet.write_fake_imagenet(
            folder, num_train=num_train, num_val=num_val, height=height, width=width, seed=0
        ),
    )


register(
    DatasetSpec(
        "imagenet",
        task_lib.IMAGENET,
        (224, 224),
        ("classifier",),
        # torchvision's ResNet-50 recipe (the PyTorch ImageNet example): SGD, momentum 0.9,
        # lr 0.1 for batch 256, weight decay 1e-4, 90 epochs. Its schedule (lr x 0.1 every
        # 30 epochs) is the cosine, stepped per epoch, here.
        dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=256, epochs=90),
        "the ILSVRC2012 archives as downloaded, ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar, read by TFDS's imagenet2012 builder (see data_pipelines/imagenet.py)",
        _imagenet_source,
        eval_split="validation",
        synthetic_help="tiny ILSVRC2012 archives of 96x128 JPEGs, 84x84 crops",
        # Δm of a run: its top-1 against the paper's vanilla ResNet-50 (Table 4(a)'s 0 dummy sets).
        paper_reference={"label/acc": paper_tables.PAPER_IMAGENET_TOP1[0]},
        paper_by_network=False,
        model_recipe=dict(backbone="resnet50", classifier_hidden=0),
    )
)
