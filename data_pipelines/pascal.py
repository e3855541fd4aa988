"""Pascal-Context's five dense tasks in the PASCAL-MT layout that ASTMT / MTI-Net
distribute, through a TFDS builder, into seeded tf.data pipelines.

On disk (``data_dir`` is the ``PASCAL_MT`` folder; ``{id}`` like ``2008_000002``)::

    ImageSets/Context/{train,val}.txt       one image id per line (4998 / 5105 in the real set)
    JPEGImages/{id}.jpg                     the image (any size; the real ones are at most 500x500)
    semseg/VOC12/{id}.png                   21-class semantic labels, 0 background, 255 ignore
      or semseg/pascal-context/{id}.png     (the first of the two that exists, as ASTMT reads it)
    human_parts/{id}.mat                    PASCAL-Part annotation: anno.objects(i).class_ind,
                                            .mask, .parts(j).part_name, .parts(j).mask
    sal_distill/{id}.png                    distilled saliency, 0..255
    normals_distill/{id}.png                distilled surface normals, RGB = (n + 1) / 2 * 255
    pascal-context/trainval/{id}.mat        Pascal-Context's 459-class ``LabelMap``

Targets (ASTMT's definitions):

- ``seg``: the PNG's labels 0..20, 255 ignored (-1 in batches).
- ``human_parts``: 7 classes, 0 background, 1..6 the six part groups of ``PART_GROUPS``
  (head, torso, upper arms, lower arms and hands, upper legs, lower legs and feet) of the
  person objects (``class_ind`` 15) that have parts; an image with none is ignored
  entirely (its pixels -1), so only images with people count towards the loss and mIoU.
- ``saliency``: ``png / 255 > 0.5``.
- ``normal``: ``2 png / 255 - 1``, rescaled to unit length, kept only on pixels whose
  Context class is one of ``NORMAL_VALID_CLASSES`` (the Context classes that NYUv2 also
  labels, and tvmonitor: the classes the normals were distilled for); elsewhere 0 (invalid).
- ``edge``: the boundaries of the Context label map: pixels where its 4-neighbour
  Laplacian is non-zero (OpenCV's kernel and border rule), thinned to one pixel
  (``skimage.morphology.thin``).

Preparing: the lists and every file they name are checked (one-line errors naming the
file), then a TFDS ``GeneratorBasedBuilder`` reads the folder as its manual dir and writes
ArrayRecord files under ``common.cache_root()/tfds/pascal_<fingerprint>`` (the JPEG bytes as
they are, the targets as PNGs); the fingerprint covers every file's name, size and
modification time, so the user's folder is only read, and edited data is prepared again.

Reading: random access in this epoch's seeded order (``common.plan_epoch``: global
shuffle, exact ``start_step``, process shards). Training augmentation (MTI-Net's): a
scale drawn from ``SCALES`` (0.5 to 2 by 0.25; image bilinear, targets nearest), a random
``crop x crop`` window (padded where the scaled image is smaller: image 0 after
normalisation, targets ignored), a horizontal flip with p = 0.5 (normal x negated), from
stateless random numbers seeded by (seed, epoch, example index). Evaluation: each image at
its own size on a ``crop x crop`` canvas (bottom/right padding ignored), so metrics are at
the original resolution. Images: ``(x / 255 - MEAN) / STD`` (ImageNet's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.common import DataError

FORMAT_VERSION = "1.0.0"
SPLITS = ("train", "val")
NUM_SEG_CLASSES = 21
NUM_PART_CLASSES = 7
PERSON_CLASS = 15  # PASCAL-Part's class_ind of "person"
IGNORE = 255  # on disk and in the prepared records
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
CROP = 512
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TARGETS = ("seg", "human_parts", "saliency", "normal", "edge")

# PASCAL-Part's part names -> the six groups of the 6-part setting (ASTMT / MTI-Net).
PART_GROUPS = {
    **dict.fromkeys(
        ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1
    ),
    "neck": 2,
    "torso": 2,
    "luarm": 3,
    "ruarm": 3,
    "llarm": 4,
    "rlarm": 4,
    "lhand": 4,
    "rhand": 4,
    "luleg": 5,
    "ruleg": 5,
    "llleg": 6,
    "rlleg": 6,
    "lfoot": 6,
    "rfoot": 6,
}

# Pascal-Context class ids (of its 459) that NYUv2's class list also has, and tvmonitor:
# where the distilled normals are kept (derived from ASTMT's NYU / Context class lists).
NORMAL_VALID_CLASSES = frozenset(
    (
        *(3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43),
        *(46, 49, 50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87),
        *(88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146),
        *(150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202),
        *(213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250),
        *(251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288),
        *(290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336),
        *(342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397),
        *(401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432),
        *(440, 441, 442, 443, 444, 446, 454, 457),
    )
)


# ---------------------------------------------------------------------------
# The folder: lists, files, and the targets of one image (numpy).


def split_ids(root: Path, split: str) -> list[str]:
    listing = root / "ImageSets" / "Context" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: missing Pascal-Context {split} list (one image id per line)")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{listing}: no image ids")
    if len(set(ids)) != len(ids):
        raise DataError(f"{listing}: an image id is listed twice")
    return ids


def example_paths(root: Path, image_id: str) -> dict[str, Path]:
    seg = root / "semseg" / "VOC12" / f"{image_id}.png"
    if not seg.is_file():
        seg = root / "semseg" / "pascal-context" / f"{image_id}.png"
    return {
        "image": root / "JPEGImages" / f"{image_id}.jpg",
        "seg": seg,
        "human_parts": root / "human_parts" / f"{image_id}.mat",
        "saliency": root / "sal_distill" / f"{image_id}.png",
        "normal": root / "normals_distill" / f"{image_id}.png",
        "context": root / "pascal-context" / "trainval" / f"{image_id}.mat",
    }


def scan(root: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[str]]:
    """Check that every file of every listed image exists; returns ``{split: ids}``."""
    root = common.require_dir(root, "Pascal-Context (PASCAL_MT) data")
    ids = {split: split_ids(root, split) for split in splits}
    for split, names in ids.items():
        for image_id in names:
            for key, path in example_paths(root, image_id).items():
                if not path.is_file():
                    where = "semseg/VOC12 or semseg/pascal-context" if key == "seg" else path.parent
                    raise DataError(
                        f"{path}: missing ({key} of {image_id}, listed in ImageSets/Context/{split}.txt; "
                        f"expected in {where})"
                    )
    return ids


def _png(path: Path, mode: str | None = None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode) if mode else image)
    except Exception as error:
        raise DataError(f"{path}: unreadable image ({type(error).__name__}: {error})") from None


def _mat(path: Path) -> dict:
    from scipy import io as scipy_io

    try:
        return scipy_io.loadmat(path)
    except Exception as error:
        raise DataError(f"{path}: unreadable .mat file ({type(error).__name__}: {error})") from None


def _field(record, name: str, path: Path):
    names = record.dtype.names or ()
    if name not in names:
        raise DataError(f"{path}: annotation has no field {name!r} (fields: {', '.join(names)})")
    return record[name]


def read_context(path: Path) -> np.ndarray:
    mat = _mat(path)
    if "LabelMap" not in mat:
        raise DataError(f"{path}: no LabelMap (Pascal-Context's label file)")
    return np.asarray(mat["LabelMap"]).astype(np.int32)


def edges_from_context(label_map: np.ndarray) -> np.ndarray:
    """Thinned boundaries of a label map: ``|Laplacian| > 0``, the 4-neighbour kernel
    with OpenCV's default border (reflect-101), then ``skimage.morphology.thin``."""
    from scipy import ndimage
    from skimage.morphology import thin

    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    laplacian = ndimage.convolve(label_map.astype(np.float64), kernel, mode="mirror")
    return thin(np.abs(laplacian) > 0).astype(np.uint8)


def read_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The 7-class part map (``IGNORE`` everywhere when no person has parts)."""
    mat = _mat(path)
    if "anno" not in mat:
        raise DataError(f"{path}: no 'anno' (a PASCAL-Part annotation)")
    anno = mat["anno"][0, 0]
    objects = np.asarray(_field(anno, "objects", path)).reshape(-1)
    target = np.zeros(shape, np.uint8)
    found = False
    for obj in objects:
        parts = np.asarray(_field(obj, "parts", path)).reshape(-1)
        if int(np.asarray(_field(obj, "class_ind", path)).reshape(-1)[0]) != PERSON_CLASS:
            continue
        if parts.size == 0:
            continue
        found = True
        for part in parts:
            name = str(np.asarray(_field(part, "part_name", path)).reshape(-1)[0])
            if name not in PART_GROUPS:
                raise DataError(f"{path}: unknown human part {name!r}")
            mask = np.asarray(_field(part, "mask", path)).astype(bool)
            if mask.shape != shape:
                raise DataError(f"{path}: part mask of shape {mask.shape}, image is {shape}")
            target[mask] = PART_GROUPS[name]
    return target if found else np.full(shape, IGNORE, np.uint8)


def normal_mask(label_map: np.ndarray) -> np.ndarray:
    return np.isin(label_map, sorted(NORMAL_VALID_CLASSES)).astype(np.uint8)


def load_example(root: Path, image_id: str) -> dict:
    """The prepared record of one image: the JPEG's path and uint8 target maps."""
    paths = example_paths(root, image_id)
    from PIL import Image

    try:
        with Image.open(paths["image"]) as image:
            width, height = image.size
    except Exception as error:
        raise DataError(
            f"{paths['image']}: unreadable image ({type(error).__name__}: {error})"
        ) from None
    shape = (height, width)

    def check(key, array, channels=None):
        expected = shape if channels is None else (*shape, channels)
        if array.shape != expected:
            raise DataError(
                f"{paths[key]}: shape {array.shape}, expected {'x'.join(map(str, expected))} "
                f"(the size of {paths['image'].name})"
            )
        return array

    seg = check("seg", _png(paths["seg"]))
    if seg.ndim != 2 or np.any((seg >= NUM_SEG_CLASSES) & (seg != IGNORE)):
        raise DataError(f"{paths['seg']}: labels outside 0..{NUM_SEG_CLASSES - 1} and {IGNORE}")
    context = check("context", read_context(paths["context"]))
    saliency = check("saliency", _png(paths["saliency"], "L"))
    normal = check("normal", _png(paths["normal"], "RGB"), 3)
    return {
        "image": str(paths["image"]),
        "seg": seg.astype(np.uint8)[..., None],
        "human_parts": read_human_parts(paths["human_parts"], shape)[..., None],
        "saliency": (saliency.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)[..., None],
        "normal": normal.astype(np.uint8),
        "normal_mask": normal_mask(context)[..., None],
        "edge": edges_from_context(context)[..., None],
    }


def fingerprint(root: Path, ids: dict[str, list[str]]) -> str:
    digest = hashlib.sha256(f"pascal/{FORMAT_VERSION}".encode())
    for split, names in ids.items():
        digest.update(f"{split}:{','.join(names)};".encode())
        for image_id in names:
            for path in example_paths(root, image_id).values():
                stat = path.stat()
                digest.update(
                    f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
                )
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# The TFDS builder.


class PascalFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads a PASCAL_MT folder (the manual dir); no download step."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Extract PASCAL_MT (ASTMT / MTI-Net) and pass its folder."

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "seg": label,
                    "human_parts": label,
                    "saliency": label,
                    "edge": label,
                    "normal": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "normal_mask": label,
                    "index": np.int64,
                }
            ),
            disable_shuffling=True,
            description="Pascal-Context's five tasks from a local PASCAL_MT folder",
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in SPLITS}

    def _generate_examples(self, root: Path, split: str) -> Iterator[tuple[int, dict]]:
        for index, image_id in enumerate(split_ids(root, split)):
            example = load_example(root, image_id)
            example["index"] = index
            yield index, example


_BUILDERS: dict[str, PascalFolder] = {}


def prepare(
    data_dir: str | Path, *, cache_dir: str | Path | None = None, verbose: bool = True
) -> PascalFolder:
    """Check the folder and build (once) its TFDS records; returns the builder."""
    root = common.require_dir(data_dir, "Pascal-Context (PASCAL_MT) data")
    ids = scan(root)
    cache = Path(cache_dir) if cache_dir is not None else common.cache_root() / "tfds"
    location = str(cache / f"pascal_{fingerprint(root, ids)}")
    builder = _BUILDERS.get(location)
    if builder is None:
        builder = PascalFolder(data_dir=location, file_format="array_record")
        _BUILDERS[location] = builder
    if not builder.is_prepared():
        if verbose:
            counts = ", ".join(f"{len(v)} {k}" for k, v in ids.items())
            print(f"preparing pascal ({counts}) from {root} into {builder.data_dir}", flush=True)
        tfds.display_progress_bar(False)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root), verify_ssl=False)
        )
    return builder


# ---------------------------------------------------------------------------
# Augmentation and batching (TF ops, stateless random numbers).

_LABELS = ("seg", "human_parts", "saliency", "edge")


def _targets_to_float(example):
    """uint8 maps -> one float32 stack (H, W, 8): seg, parts, saliency, edge, normal x3,
    normal mask; nearest-neighbour resizing and cropping then treat them alike."""
    parts = [tf.cast(example[key], tf.float32) for key in _LABELS]
    parts += [tf.cast(example["normal"], tf.float32), tf.cast(example["normal_mask"], tf.float32)]
    return tf.concat(parts, axis=-1)


def _pad_to(x, height, width, value):
    pad_h = tf.maximum(height - tf.shape(x)[0], 0)
    pad_w = tf.maximum(width - tf.shape(x)[1], 0)
    return tf.pad(x, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=value)


def augment_example(image, targets, seed, crop: int):
    """Random scale (``SCALES``), random ``crop x crop`` window, flip; ``image`` float
    (H, W, 3) normalised, ``targets`` the float stack of ``_targets_to_float`` with
    ``IGNORE`` already in the labels. Returns both cropped, and the flip."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    choice = tf.random.stateless_uniform([], seeds[0], 0, len(SCALES), dtype=tf.int32)
    scale = tf.gather(tf.constant(SCALES, tf.float32), choice)
    size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, size, method="bilinear")
    targets = tf.image.resize(targets, size, method="nearest")
    image = _pad_to(image, crop, crop, 0.0)
    pad_value = tf.constant([IGNORE] * len(_LABELS) + [0.0] * 4, tf.float32)
    targets = _pad_to(targets - pad_value, crop, crop, 0.0) + pad_value
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top = tf.random.stateless_uniform([], seeds[1], 0, height - crop + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, width - crop + 1, dtype=tf.int32)
    image = image[top : top + crop, left : left + crop]
    targets = targets[top : top + crop, left : left + crop]
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    targets = tf.cond(flip, lambda: tf.reverse(targets, [1]), lambda: targets)
    return image, targets, flip


def _finish_targets(targets, flip):
    """The float stack -> batch fields (labels int32 with -1 ignored, unit normals)."""
    out = {}
    for i, key in enumerate(_LABELS):
        value = tf.cast(targets[..., i], tf.int32)
        out[key] = tf.where(value == IGNORE, -1, value)
    normal = targets[..., 4:7] * (2.0 / 255.0) - 1.0
    normal = normal * tf.where(flip, tf.constant([-1.0, 1.0, 1.0]), tf.ones(3))
    length = tf.norm(normal, axis=-1, keepdims=True)
    valid = (targets[..., 7:8] > 0.5) & (length > 0)
    out["normal"] = tf.where(valid, normal / tf.maximum(length, 1e-12), 0.0)
    return out


class PascalDataset(common.EpochDataset):
    """One epoch of dict batches (numpy); ``len()`` is the number of batches.

    ``image`` float32 (B, crop, crop, 3) normalised; ``seg``, ``human_parts``,
    ``saliency``, ``edge`` int32 (B, crop, crop) with -1 ignored (padding included);
    ``normal`` float32 (B, crop, crop, 3), unit vectors or all-zero invalid; ``index``
    int64 (B,), the example's position in its split's list.
    """

    def __init__(
        self, builder, split: str, batch_size: int, crop: int, options: common.EpochOptions
    ):
        self._source = builder.as_data_source(split=split)
        super().__init__(len(self._source), split, batch_size, options, "pascal make_dataset")
        self.crop = crop

    def _read(self, position):
        example = self._source[int(position)]
        fields = ("image", *_LABELS, "normal", "normal_mask")
        return tuple(np.asarray(example[k], np.uint8) for k in fields) + (
            np.int64(example["index"]),
        )

    def as_tf_dataset(self) -> tf.data.Dataset:
        crop = self.crop
        fields = ("image", *_LABELS, "normal", "normal_mask")

        def read(position):
            values = tf.numpy_function(
                self._read, [position], [tf.uint8] * len(fields) + [tf.int64], stateful=False
            )
            example = {}
            for key, value in zip(fields, values):
                value.set_shape((None, None, 3 if key in ("image", "normal") else 1))
                example[key] = value
            values[-1].set_shape(())
            example["index"] = values[-1]
            return example

        def finish(example):
            image = (tf.cast(example["image"], tf.float32) / 255.0 - MEAN) / STD
            targets = _targets_to_float(example)
            if self.options.augment:
                seed = tf.stack(
                    [
                        tf.constant(self.options.seed, tf.int64) * 1_000_003 + self.options.epoch,
                        example["index"],
                    ]
                )
                image, targets, flip = augment_example(image, targets, seed, crop)
            else:
                tf.debugging.assert_less_equal(
                    tf.shape(image)[:2],
                    crop,
                    message=f"an image is larger than the {crop}x{crop} canvas",
                )
                image = _pad_to(image, crop, crop, 0.0)
                pad_value = tf.constant([IGNORE] * len(_LABELS) + [0.0] * 4, tf.float32)
                targets = _pad_to(targets - pad_value, crop, crop, 0.0) + pad_value
                flip = tf.constant(False)
            image.set_shape((crop, crop, 3))
            targets.set_shape((crop, crop, 8))
            return {"image": image, **_finish_targets(targets, flip), "index": example["index"]}

        ds = tf.data.Dataset.from_tensor_slices(self.order)
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return self.batched(ds)

    def __iter__(self):
        return iter(self.as_tf_dataset().as_numpy_iterator())


class PascalSource:
    """A checked, prepared PASCAL_MT folder; ``dataset(split, batch_size, ...)`` makes
    epochs of it. ``crop``: the training crop and the evaluation canvas (512, MTI-Net's)."""

    def __init__(self, data_dir, *, crop: int = CROP, cache_dir=None, verbose: bool = True):
        self.data_dir, self.crop = Path(data_dir), crop
        self.builder = prepare(data_dir, cache_dir=cache_dir, verbose=verbose)
        self._check_canvas()

    def _check_canvas(self):
        from PIL import Image

        root = self.data_dir
        for image_id in split_ids(root, "val"):
            path = example_paths(root, image_id)["image"]
            with Image.open(path) as image:
                width, height = image.size
            if height > self.crop or width > self.crop:
                raise DataError(
                    f"{path}: {height}x{width} is larger than the {self.crop}x{self.crop} "
                    "evaluation canvas (Pascal-Context's images are at most 500x500)"
                )

    def dataset(self, split: str, batch_size: int, **options) -> PascalDataset:
        """One epoch of ``split``; ``options`` are ``common.EpochOptions``' keywords."""
        if split not in SPLITS:
            raise ValueError(f"pascal make_dataset: unknown split {split!r}; choose from {SPLITS}")
        epoch = common.EpochOptions(**options).resolve(split)
        return PascalDataset(self.builder, split, batch_size, self.crop, epoch)
