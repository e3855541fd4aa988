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
import numpy as np

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

    @property
    def command(self) -> str:
        return f"experiments.{self.name}"

    def paper_rows(self, network: str) -> dict:
        """The paper's table rows for this data set and network ({} when it has none)."""
        if not self.paper_reference:
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


def _utkface_source(config, verbose):
    from data_pipelines import utkface

    if config.data.synthetic:
        root = _fake_utkface_root(utkface, sum(config.data.synthetic_counts) * 4)
        description = f"built-in generated faces in the UTKFace layout ({root})"
    else:
        root, description = Path(config.data.data_dir), f"UTKFace from {config.data.data_dir}"
    return utkface.open_source(root), description


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
        "utkface",
        task_lib.UTKFACE,
        (64, 64),
        ("classifier",),
        dict(optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64, epochs=100),
        "a folder of UTKFace age_gender_race_date*.jpg files",
        _utkface_source,
        eval_split="test",
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
