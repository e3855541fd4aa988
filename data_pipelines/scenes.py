"""Dense scene data sets (NYUv2, Cityscapes) from their community ``.npy`` folders,
through a TFDS builder, into seeded tf.data pipelines.

On disk (the mtan / auto-lambda preprocessing; ``{i}`` runs 0..n-1 in every folder):

    NYUv2       root/{train,val}/image/{i}.npy    float (H, W, 3) in [0, 1]
                root/{train,val}/label/{i}.npy    (H, W) integers 0..12, -1 ignore (any int or float dtype)
                root/{train,val}/depth/{i}.npy    float (H, W, 1) or (H, W), metres, 0 invalid
                root/{train,val}/normal/{i}.npy   float (H, W, 3) in [-1, 1], all-zero invalid
    Cityscapes  root/{train,val}/image/{i}.npy    float (H, W, 3) in [0, 1]
                root/{train,val}/label_19/{i}.npy (H, W) integers 0..18, -1 ignore
                root/{train,val}/part_seg/{i}.npy (H, W) integers 0..9, -1 ignore
                root/{train,val}/depth/{i}.npy    float (H, W, 1) or (H, W), disparity, -1 invalid

The real sets are 288x384 (NYUv2, 795 train / 654 val) and 256x512 (Cityscapes); any
size works as long as every file of a set agrees.

Preparing: the folder is checked (counts, names, shapes, dtypes: one-line errors naming
the file), then a TFDS ``GeneratorBasedBuilder`` reads it as its manual dir and writes
versioned ArrayRecord files under ``common.cache_root()/tfds/<name>_<fingerprint>``; the
fingerprint covers every file's name, size and modification time, so editing the data
prepares it again and the user's folder is never written to.

Reading: random access into the prepared records in this epoch's seeded order
(``common.epoch_order``), so shuffling is global, ``start_step`` skips exactly, and
a process reads only its shard. Augmentation (train) is the original code's
(auto-lambda's ``DataTransform``), in TF ops with stateless random numbers seeded by
(seed, epoch, example index): NYUv2 a scale from {1.0, 1.2, 1.5} (sizes truncated,
345x460 at 1.2), a crop back to 288x384; Cityscapes a 256x256 crop at scale 1; then a
horizontal flip with p = 0.5 (normal x negated); depth / scale, disparity * scale; the
image resized bilinearly, every other field by PyTorch's legacy nearest-neighbour rule
(see ``Augmentation``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.common import DataError

FORMAT_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class Field:
    key: str  # batch key (the task's name, or "image")
    folder: str  # folder name on disk
    kind: str  # image | label | depth | disp | normal
    channels: int | None  # trailing channel axis; None for (H, W) labels


RESIZE_RULES = ("legacy", "half_pixel")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation: random scale from ``scales``, random crop, flip p = 0.5.

    ``scales``: the resized size is ``(int(H * s), int(W * s))``, truncated as the
    original code does (``resize_rule="legacy"``) or rounded (``"half_pixel"``).
    ``crop``: the crop's size as fractions of the stored ``(H, W)`` (Cityscapes in the
    original: 256x256 crops of the 256x512 images, ``(1.0, 0.5)``).
    ``resize_rule``: ``"legacy"`` (default, the original's torchvision ``resize``): the
    image bilinear with half-pixel centres, every other field (labels, depth, disparity,
    normals) nearest neighbour by PyTorch's legacy rule ``src = floor(dst * in / out)``
    in float32; ``"half_pixel"``: nearest neighbour with half-pixel centres
    (``src = floor((dst + 0.5) * in / out)``, symmetric, TF's rule) and rounded sizes.
    Normals are always resized by nearest neighbour, so valid normals stay unit vectors
    and invalid (all-zero) ones stay zero.
    """

    scales: tuple[float, ...] = (1.0, 1.2, 1.5)
    crop: tuple[float, float] = (1.0, 1.0)
    resize_rule: str = "legacy"

    def __post_init__(self):
        if not self.scales or min(self.scales) < 1.0:
            raise ValueError(
                f"Augmentation: scales must be >= 1 (the crop never pads), got {self.scales}"
            )
        if not all(0.0 < c <= 1.0 for c in self.crop) or len(self.crop) != 2:
            raise ValueError(f"Augmentation: crop must be two fractions in (0, 1], got {self.crop}")
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(
                f"Augmentation: resize_rule must be one of {RESIZE_RULES}, got {self.resize_rule!r}"
            )

    def crop_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, int(height * self.crop[0])), max(1, int(width * self.crop[1]))

    def resized_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """The resized ``(h, w)`` per scale, in Python floats as the original's
        ``int(raw_h * sc)`` (288 x 1.2 = 345.6 -> 345)."""
        size = int if self.resize_rule == "legacy" else round
        return tuple((size(height * s), size(width * s)) for s in self.scales)


@dataclasses.dataclass(frozen=True)
class SceneFormat:
    name: str
    fields: tuple[Field, ...]
    num_classes: Mapping[str, int]  # label fields: classes (values 0..n-1, or -1)
    splits: tuple[str, ...] = ("train", "val")
    augmentation: Augmentation = Augmentation()  # the original code's training augmentation


NYUV2 = SceneFormat(
    "nyuv2",
    (
        Field("image", "image", "image", 3),
        Field("seg", "label", "label", None),
        Field("depth", "depth", "depth", 1),
        Field("normal", "normal", "normal", 3),
    ),
    {"seg": 13},
    augmentation=Augmentation(scales=(1.0, 1.2, 1.5)),
)
CITYSCAPES = SceneFormat(
    "cityscapes",
    (
        Field("image", "image", "image", 3),
        Field("seg", "label_19", "label", None),
        Field("part_seg", "part_seg", "label", None),
        Field("disp", "depth", "disp", 1),
    ),
    {"seg": 19, "part_seg": 10},
    # auto-lambda: random 256x256 crops of the 256x512 images at scale 1, and flips.
    augmentation=Augmentation(scales=(1.0,), crop=(1.0, 0.5)),
)
FORMATS = {f.name: f for f in (NYUV2, CITYSCAPES)}

_INDEX_FILE = re.compile(r"^(\d+)\.npy$")


# ---------------------------------------------------------------------------
# Checking the user's folder (cheap: headers only, via memory maps).


def _peek(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise DataError(f"{path}: unreadable .npy file ({type(error).__name__}: {error})") from None
    return array.shape, array.dtype


def _expected_shape(field: Field, height: int, width: int) -> tuple[int, ...]:
    return (height, width) if field.channels is None else (height, width, field.channels)


def _check_file(field: Field, path: Path, shape, dtype, height: int, width: int) -> None:
    ok = tuple(shape) == _expected_shape(field, height, width)
    if field.channels == 1 and tuple(shape) == (height, width):
        ok = True  # depth / disparity saved without the channel axis
    if not ok:
        wanted = "x".join(map(str, _expected_shape(field, height, width)))
        raise DataError(
            f"{path}: shape {tuple(shape)}, expected {wanted} ({field.kind}, like {field.folder}/0.npy's size)"
        )
    kinds = "iuf" if field.kind == "label" else "f"
    if dtype.kind not in kinds:
        raise DataError(
            f"{path}: dtype {dtype}, expected {'an integer or float' if field.kind == 'label' else 'a float'} array"
        )


def scan_split(fmt: SceneFormat, root: str | Path, split: str) -> tuple[int, int, int]:
    """Check ``root/split``: every folder present with files 0..n-1, the same n
    everywhere, consistent shapes and dtypes. Returns ``(n, height, width)``."""
    root = common.require_dir(root, f"{fmt.name} data")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir}: missing {fmt.name} split folder (expected {'/'.join(f.folder for f in fmt.fields)} inside)"
        )
    counts = {}
    for field in fmt.fields:
        folder = split_dir / field.folder
        if not folder.is_dir():
            raise DataError(
                f"{folder}: missing folder ({fmt.name} needs {', '.join(f.folder for f in fmt.fields)} in {split_dir})"
            )
        indices = sorted(
            int(m.group(1)) for m in map(_INDEX_FILE.match, (p.name for p in folder.iterdir())) if m
        )
        if not indices:
            raise DataError(f"{folder}: no {{i}}.npy files")
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise DataError(
                f"{folder}: files are not numbered 0..{len(indices) - 1} (missing {missing[0]}.npy)"
            )
        counts[field.folder] = len(indices)
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"{split_dir}: folders hold different numbers of files ({listing})")
    count = next(iter(counts.values()))
    image_shape, _ = _peek(split_dir / "image" / "0.npy")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise DataError(f"{split_dir / 'image' / '0.npy'}: shape {image_shape}, expected HxWx3")
    height, width = image_shape[:2]
    for field in fmt.fields:
        for i in range(count):
            path = split_dir / field.folder / f"{i}.npy"
            shape, dtype = _peek(path)
            _check_file(field, path, shape, dtype, height, width)
    return count, height, width


def fingerprint(fmt: SceneFormat, root: Path, splits: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{fmt.name}/{FORMAT_VERSION}".encode())
    for split in splits:
        for field in fmt.fields:
            folder = root / split / field.folder
            for path in sorted(folder.glob("*.npy")):
                stat = path.stat()
                digest.update(
                    f"{split}/{field.folder}/{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
                )
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass
class SceneConfig(tfds.core.BuilderConfig):
    fmt: SceneFormat = NYUV2
    height: int = 0
    width: int = 0
    splits: tuple[str, ...] = ("train", "val")


class SceneFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads a NYUv2 / Cityscapes ``.npy`` folder (the manual dir); no download step."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the preprocessed .npy folders (see data_pipelines/scenes.py) in the manual dir: "
        "<manual_dir>/{train,val}/<field>/{i}.npy."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        config: SceneConfig = self.builder_config
        features = {"index": np.int64}
        for field in config.fmt.fields:
            shape = _expected_shape(field, config.height, config.width)
            dtype = np.int16 if field.kind == "label" else np.float32
            features[field.key] = tfds.features.Tensor(shape=shape, dtype=dtype)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            description=f"{config.fmt.name} from local .npy folders ({config.height}x{config.width})",
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {
            split: self._generate_examples(root / split) for split in self.builder_config.splits
        }

    def _generate_examples(self, split_dir: Path) -> Iterator[tuple[int, dict]]:
        config: SceneConfig = self.builder_config
        count = len(list((split_dir / "image").glob("*.npy")))
        for i in range(count):
            example = {"index": i}
            for field in config.fmt.fields:
                path = split_dir / field.folder / f"{i}.npy"
                array = common.load_npy(path)
                _check_file(field, path, array.shape, array.dtype, config.height, config.width)
                array = array.reshape(_expected_shape(field, config.height, config.width))
                if field.kind == "label":
                    if not np.all(array == np.round(array)):
                        raise DataError(f"{path}: label values are not integers")
                    classes = config.fmt.num_classes[field.key]
                    if array.min() < -1 or array.max() >= classes:
                        raise DataError(
                            f"{path}: labels in [{array.min()}, {array.max()}], expected 0..{classes - 1} or -1"
                        )
                    array = array.astype(np.int16)
                else:
                    if not np.all(np.isfinite(array)):
                        raise DataError(f"{path}: contains NaN or infinity")
                    check_values(field, path, array)
                    array = array.astype(np.float32)
                example[field.key] = array
            yield i, example


def check_values(field: Field, path: Path, array: np.ndarray) -> None:
    """One-line DataErrors for values a field cannot hold (common preprocessing mistakes)."""
    low, high = float(array.min()), float(array.max())
    if field.kind == "image" and (low < 0.0 or high > 1.0):
        hint = " (stored as 0..255? divide by 255)" if high > 1.0 and high <= 255.0 else ""
        raise DataError(
            f"{path}: image values in [{low:g}, {high:g}], expected floats in [0, 1]{hint}"
        )
    if field.kind == "depth" and low < 0.0:
        raise DataError(
            f"{path}: negative depth {low:g}; depth is in metres with 0 for invalid pixels"
        )
    if field.kind == "disp" and np.any((array < 0) & (array != -1.0)):
        raise DataError(
            f"{path}: negative disparity {low:g}; disparity is >= 0 with -1 for invalid pixels"
        )
    if field.kind == "normal":
        norms = np.linalg.norm(array.reshape(-1, 3), axis=-1)
        if np.any(norms > 1.01):
            raise DataError(
                f"{path}: normals of length up to {norms.max():.3g}, expected unit vectors "
                "(or all zero for invalid pixels) with components in [-1, 1]"
            )


_BUILDERS: dict[tuple[str, str, str], SceneFolder] = {}


def prepare(
    fmt: SceneFormat,
    data_dir: str | Path,
    *,
    splits: Sequence[str] = ("train", "val"),
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> SceneFolder:
    """Check the folder and build (once) its TFDS records; returns the builder."""
    data_dir = common.require_dir(data_dir, f"{fmt.name} data")
    for split in splits:
        if split not in fmt.splits:
            raise ValueError(f"{fmt.name}: unknown split {split!r}; choose from {fmt.splits}")
    sizes = {split: scan_split(fmt, data_dir, split) for split in splits}
    if len({s[1:] for s in sizes.values()}) > 1:
        found = ", ".join(f"{k}: {v[1]}x{v[2]}" for k, v in sizes.items())
        raise DataError(f"{data_dir}: splits have different image sizes ({found})")
    height, width = next(iter(sizes.values()))[1:]
    key = fingerprint(fmt, data_dir, splits)
    cache = Path(cache_dir) if cache_dir is not None else common.cache_root() / "tfds"
    config = SceneConfig(
        name=f"{height}x{width}_{'_'.join(splits)}",
        fmt=fmt,
        height=height,
        width=width,
        splits=tuple(splits),
    )
    builder_key = (fmt.name, str(cache / f"{fmt.name}_{key}"), config.name)
    builder = _BUILDERS.get(builder_key)
    if builder is None:  # one builder per prepared set and process (TFDS logs each construction)
        builder = SceneFolder(config=config, data_dir=builder_key[1], file_format="array_record")
        _BUILDERS[builder_key] = builder
    if not builder.is_prepared():
        if verbose:
            total = sum(s[0] for s in sizes.values())
            print(
                f"preparing {fmt.name} ({total} examples, {height}x{width}) from {data_dir} "
                f"into {builder.data_dir}",
                flush=True,
            )
        tfds.display_progress_bar(False)  # our one line above says what happens
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(data_dir), verify_ssl=False)
        )
    return builder


# ---------------------------------------------------------------------------
# Augmentation (TF ops, stateless random numbers).


def legacy_nearest_indices(out_size, in_size):
    """PyTorch's legacy ``nearest`` source indices: ``min(floor(dst * (in / out)), in - 1)``
    with the ratio and the product in float32, as ATen computes them."""
    ratio = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    source = tf.cast(tf.floor(tf.cast(tf.range(out_size), tf.float32) * ratio), tf.int32)
    return tf.minimum(source, in_size - 1)


def augment_example(
    example: Mapping[str, tf.Tensor],
    fmt: SceneFormat,
    seed: tf.Tensor,
    augmentation: Augmentation | None = None,
) -> dict[str, tf.Tensor]:
    """Random scale, crop and horizontal flip (``Augmentation``; the format's default).

    ``seed``: shape-(2,) int seed for the stateless ops. Returns a new dict with the same
    keys and dtypes (spatial size that of the crop); also ``scale`` and ``flip`` (for
    tests and logging). Normals' x component is negated by the flip, depth divided by the
    scale and disparity multiplied by it; invalid values (depth 0, disparity -1, normal
    0) stay invalid.
    """
    aug = augmentation or fmt.augmentation
    seeds = tf.random.experimental.stateless_split(seed, 4)
    height, width = example["image"].shape[0], example["image"].shape[1]
    crop_h, crop_w = aug.crop_size(height, width)
    sizes = aug.resized_sizes(height, width)
    choice = tf.random.stateless_uniform([], seeds[0], 0, len(aug.scales), dtype=tf.int32)
    scale = tf.gather(tf.constant(aug.scales, tf.float32), choice)
    new_h = tf.gather(tf.constant([h for h, _ in sizes], tf.int32), choice)
    new_w = tf.gather(tf.constant([w for _, w in sizes], tf.int32), choice)
    top = tf.random.stateless_uniform([], seeds[1], 0, new_h - crop_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, new_w - crop_w + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    kinds = {f.key: f.kind for f in fmt.fields}
    if aug.resize_rule == "legacy":  # source rows / columns of the crop, shared by every field
        rows = legacy_nearest_indices(new_h, height)[top : top + crop_h]
        cols = legacy_nearest_indices(new_w, width)[left : left + crop_w]
    out = {}
    for key, value in example.items():
        kind = kinds.get(key)
        if kind is None:
            out[key] = value
            continue
        x = tf.cast(value[..., None] if kind == "label" else value, tf.float32)
        if kind == "image":
            x = tf.image.resize(x, tf.stack([new_h, new_w]), method="bilinear")[
                top : top + crop_h, left : left + crop_w
            ]
        elif aug.resize_rule == "legacy":
            x = tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)
        else:
            x = tf.image.resize(x, tf.stack([new_h, new_w]), method="nearest")[
                top : top + crop_h, left : left + crop_w
            ]
        x = tf.cond(flip, lambda x=x: tf.reverse(x, axis=[1]), lambda x=x: x)
        if kind == "normal":
            x = x * tf.cond(flip, lambda: tf.constant([-1.0, 1.0, 1.0]), lambda: tf.ones(3))
        elif kind == "depth":
            x = x / scale  # 0 (invalid) stays 0
        elif kind == "disp":
            x = tf.where(x == -1.0, x, x * scale)  # -1 (invalid) stays -1
        if kind == "label":
            x = tf.cast(x[..., 0], value.dtype)
        x.set_shape((crop_h, crop_w) + tuple(value.shape[2:]))
        out[key] = x
    out["scale"], out["flip"] = scale, flip
    return out


# ---------------------------------------------------------------------------
# The pipeline.


class SceneDataset(common.EpochDataset):
    """One epoch of dict batches (numpy). ``len()`` is the number of batches.

    Batches: ``image`` float32 (B, H, W, 3) in [-1, 1]; segmentation keys int32 (B, H, W)
    with -1 ignore; ``depth`` / ``disp`` float32 (B, H, W, 1) with their invalid values
    (0 / -1) kept; ``normal`` float32 (B, H, W, 3), all-zero invalid; ``index`` int64 (B,)
    (the example's number in its split).
    """

    def __init__(
        self,
        fmt: SceneFormat,
        builder: SceneFolder,
        split: str,
        batch_size: int,
        options: common.EpochOptions,
        augmentation: Augmentation | None = None,
    ):
        self._source = builder.as_data_source(split=split)
        super().__init__(len(self._source), split, batch_size, options, f"{fmt.name} make_dataset")
        self.fmt = fmt
        self.augmentation = augmentation or fmt.augmentation
        self.height, self.width = builder.builder_config.height, builder.builder_config.width

    def _read(self, index):
        example = self._source[int(index)]
        return tuple(example[f.key] for f in self.fmt.fields) + (np.int64(example["index"]),)

    def as_tf_dataset(self) -> tf.data.Dataset:
        fields = self.fmt.fields
        dtypes = [tf.int16 if f.kind == "label" else tf.float32 for f in fields] + [tf.int64]

        def read(position):
            values = tf.numpy_function(self._read, [position], dtypes, stateful=False)
            example = {}
            for field, value in zip(fields, values):
                value.set_shape(_expected_shape(field, self.height, self.width))
                example[field.key] = value
            values[-1].set_shape(())
            example["index"] = values[-1]
            return example

        def finish(example):
            if self.options.augment:
                seed = tf.stack(
                    [
                        tf.constant(self.options.seed, tf.int64) * 1_000_003 + self.options.epoch,
                        example["index"],
                    ]
                )
                example = augment_example(example, self.fmt, seed, self.augmentation)
                example.pop("scale"), example.pop("flip")
            out = {"image": example["image"] * 2.0 - 1.0, "index": example["index"]}
            for field in fields[1:]:
                value = example[field.key]
                out[field.key] = tf.cast(value, tf.int32) if field.kind == "label" else value
            return out

        ds = tf.data.Dataset.from_tensor_slices(self.order)
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return self.batched(ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.as_tf_dataset().as_numpy_iterator())


class SceneSource:
    """A checked, prepared scene folder: ``dataset(split, batch_size, ...)`` makes epochs
    of it without scanning the folder again (``make_dataset`` takes the same keywords)."""

    def __init__(
        self,
        fmt: SceneFormat,
        data_dir: str | Path,
        *,
        cache_dir: str | Path | None = None,
        verbose: bool = True,
        augmentation: Augmentation | None = None,
    ):
        self.fmt, self.data_dir = fmt, Path(data_dir)
        self.augmentation = augmentation or fmt.augmentation
        self.builder = prepare(
            fmt, data_dir, splits=fmt.splits, cache_dir=cache_dir, verbose=verbose
        )
        self.height, self.width = (
            self.builder.builder_config.height,
            self.builder.builder_config.width,
        )

    def dataset(self, split: str, batch_size: int, **options) -> SceneDataset:
        """One epoch of ``split``; ``options`` are ``common.EpochOptions``' keywords."""
        if split not in self.fmt.splits:
            raise ValueError(
                f"{self.fmt.name} make_dataset: unknown split {split!r}; choose from {self.fmt.splits}"
            )
        epoch = common.EpochOptions(**options).resolve(split)
        return SceneDataset(self.fmt, self.builder, split, batch_size, epoch, self.augmentation)


def make_dataset(
    fmt: SceneFormat,
    data_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
    augmentation: Augmentation | None = None,
    **options,
) -> SceneDataset:
    """One epoch of ``split`` from a ``.npy`` folder in ``fmt``'s layout (module docstring);
    ``options`` are ``common.EpochOptions``' keywords.

    ``augment`` and ``shuffle`` default to True for "train" and False otherwise;
    ``augmentation`` to the format's (the original code's). A short last batch is kept,
    as the original's data loader keeps it; ``drop_remainder=True`` drops it, and then
    every process yields the same number of batches (with it kept, process shards that
    differ by one example can differ by one batch). The order depends only on
    ``(seed, epoch)``; ``start_step`` skips the first batches of that epoch exactly. This
    process reads its shard of the split (``jax.process_index()`` of
    ``jax.process_count()`` unless given). Checks the folder each call: a run opens a
    ``SceneSource`` once instead.
    """
    source = SceneSource(
        fmt, data_dir, cache_dir=cache_dir, verbose=verbose, augmentation=augmentation
    )
    return source.dataset(split, batch_size, **options)
