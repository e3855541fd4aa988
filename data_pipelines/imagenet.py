"""ImageNet (ILSVRC2012) classification through TFDS's own ``imagenet2012`` builder.

On disk (the archives as downloaded from image-net.org, not extracted):

    DIR/ILSVRC2012_img_train.tar   1000 inner archives nXXXXXXXX.tar of nXXXXXXXX_k.JPEG
    DIR/ILSVRC2012_img_val.tar     ILSVRC2012_val_00000001.JPEG .. _00050000.JPEG

Preparing: the two archives are checked (one-line ``DataError`` naming a missing or
unreadable one), then TFDS's ``imagenet2012`` builder reads them as its manual dir
(through symbolic links in the cache, so it sees exactly these two and never a test
archive beside them) and writes ArrayRecord files under
``common.cache_root()/tfds/imagenet2012_<fingerprint>`` (about 150 GB for the real
set); the fingerprint covers both archives' sizes and modification times. The user's
folder is only read. Labels are the builder's: the index of the synset in TFDS's
bundled ``labels.txt`` (sorted WordNet ids), validation labels from its
``validation_labels.txt``. Preparing the real set takes hours once; every run after
reads the prepared records.

Reading: random access into the records in this epoch's seeded order
(``common.plan_epoch``), so shuffling is global, ``start_step`` skips exactly and a
process reads only its shard; the JPEG bytes are decoded in the tf.data graph.
Preprocessing is torchvision's ResNet recipe (the PyTorch ImageNet example): training
``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))`` (10 attempts, then the
centre crop of the clamped aspect ratio) and ``RandomHorizontalFlip()``, with stateless
random numbers seeded by (seed, epoch, example index) (``train_crop``); evaluation
``Resize(R)`` of the shorter side (the longer side ``int(R * long / short)``) and
``CenterCrop(S)`` (offsets rounded half to even, as Python's ``round``), with ``S`` =
``image_size`` (224) and ``R = S * 256 // 224`` (256). Resizing is bilinear with
antialiasing (PIL's filter, which torchvision uses); pixels are then scaled to [0, 1]
and normalised with ImageNet's mean and std. JPEGs are decoded with libjpeg's accurate
DCT, as PIL decodes them; a training crop decodes only its window
(``tf.image.decode_and_crop_jpeg``), which can differ from cropping the whole decoded
image by a few grey levels along the window's edge (chroma upsampling).

``write_fake_imagenet`` writes a tiny pair of archives in the real format (synsets and
validation labels those of TFDS's label files), so the same builder prepares the
built-in data of ``--synthetic`` and the tests.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.common import DataError
from data_pipelines.utkface import MEAN, STD

FORMAT_VERSION = "1.0.0"
NUM_CLASSES = 1000
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
SPLITS = tuple(ARCHIVES)
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation"}
SCALE = (0.08, 1.0)  # RandomResizedCrop's area fractions
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and aspect ratios (width / height)
CROP_ATTEMPTS = 10
# libjpeg's accurate integer DCT, as PIL (torchvision's decoder); TF's default is the fast one
DCT_METHOD = "INTEGER_ACCURATE"
LABELS_FILE = "datasets/imagenet2012/labels.txt"
VALIDATION_LABELS_FILE = "datasets/imagenet2012/validation_labels.txt"


def canonical_split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise ValueError(f"ImageNet: unknown split {split!r}; choose from {tuple(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[split]


def eval_resize_size(image_size: int) -> int:
    """The shorter side before the centre crop: 256 for 224 (``S * 256 // 224``)."""
    return image_size * 256 // 224


def synsets() -> list[str]:
    """TFDS's bundled synset list: class ``i`` is line ``i`` of its ``labels.txt``."""
    return tfds.core.tfds_path(LABELS_FILE).read_text().split()


def validation_synsets() -> list[str]:
    """The synset of each validation image, in the order of their sorted file names."""
    return tfds.core.tfds_path(VALIDATION_LABELS_FILE).read_text().split()


# ---------------------------------------------------------------------------
# Checking the folder and preparing it.


def check_folder(data_dir: str | Path) -> dict[str, Path]:
    """The two archives of ``data_dir`` by split; a one-line DataError naming what is
    missing or not a tar archive."""
    folder = common.require_dir(data_dir, "ImageNet data")
    found = {}
    for split, name in ARCHIVES.items():
        path = folder / name
        if not path.is_file():
            extracted = [d for d in ("train", "val") if (folder / d).is_dir()]
            hint = (
                f"; an extracted {extracted[0]}/ folder is not read: keep the archives as downloaded"
                if extracted
                else ""
            )
            raise DataError(
                f"{path}: missing ImageNet archive (expected {name}, the ILSVRC2012 {split} "
                f"images as downloaded from image-net.org, in {folder}){hint}"
            )
        try:
            ok = tarfile.is_tarfile(path)
        except OSError as error:
            raise DataError(f"{path}: unreadable ({error.strerror or error})") from None
        if not ok:
            raise DataError(
                f"{path}: not a tar archive (expected {name} as downloaded from image-net.org)"
            )
        found[split] = path
    return found


def fingerprint(archives: dict[str, Path]) -> str:
    """The archives' sizes and modification times (not their folder: moving the archives
    does not prepare them again)."""
    digest = hashlib.sha1(FORMAT_VERSION.encode())
    for split in SPLITS:
        stat = archives[split].stat()
        digest.update(f"{split}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _one_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return " ".join(text.split())[:300]


_BUILDERS: dict[str, tfds.core.DatasetBuilder] = {}


def prepare(
    data_dir: str | Path, *, cache_dir: str | Path | None = None, verbose: bool = True
) -> tfds.core.DatasetBuilder:
    """TFDS's ``imagenet2012`` builder over ``data_dir``'s archives, prepared (once) as
    ArrayRecord files under ``cache_dir`` (default ``common.cache_root()/"tfds"``)."""
    archives = check_folder(data_dir)
    cache = Path(cache_dir) if cache_dir is not None else common.cache_root() / "tfds"
    prepared = cache / f"imagenet2012_{fingerprint(archives)}"
    builder = _BUILDERS.get(str(prepared))
    if builder is None:  # one builder per prepared set and process
        builder = tfds.builder("imagenet2012", data_dir=str(prepared), file_format="array_record")
        _BUILDERS[str(prepared)] = builder
    if not builder.is_prepared():
        manual = prepared / "manual"
        try:
            manual.mkdir(parents=True, exist_ok=True)
            for path in archives.values():
                link = manual / path.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(path.resolve())
        except OSError as error:
            raise DataError(
                f"{manual}: cannot link the archives there ({error.strerror or error}); "
                "set DGR_JAX_CACHE to a writable folder"
            ) from None
        if verbose:
            print(
                f"preparing ImageNet with TFDS's imagenet2012 builder from {Path(data_dir)} into "
                f"{builder.data_dir} (once; hours for the real archives)",
                flush=True,
            )
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
            )
        except Exception as error:  # TFDS raises many kinds; the user needs one line
            raise DataError(
                f"{Path(data_dir)}: TFDS's imagenet2012 builder could not prepare the archives "
                f"({type(error).__name__}: {_one_line(error)})"
            ) from None
    return builder


# ---------------------------------------------------------------------------
# Preprocessing (TF ops, stateless random numbers).


def example_seed(seed, epoch, index) -> tf.Tensor:
    """The shape-(2,) stateless seed of one example in one epoch."""
    return tf.stack(
        [
            tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64),
            tf.cast(index, tf.int64),
        ]
    )


def random_resized_crop_window(height, width, seed) -> tuple[tf.Tensor, ...]:
    """torchvision's ``RandomResizedCrop.get_params`` in TF: ``(top, left, h, w)``.

    Ten attempts at an area ``U(SCALE) * H * W`` and an aspect ratio ``exp(U(log RATIO))``
    (sizes rounded half to even, as Python's ``round``); the first that fits is taken,
    at a uniform position. If none fits: the whole image cropped to the nearest aspect
    ratio in ``RATIO``, centred.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    draws = tf.random.stateless_uniform([4, CROP_ATTEMPTS], seed, dtype=tf.float32)
    area = h * w * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws[0])
    log_low, log_high = np.log(RATIO[0]), np.log(RATIO[1])
    aspect = tf.exp(log_low + (log_high - log_low) * draws[1])
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    top = tf.cast(
        tf.floor(draws[2, first] * tf.cast(height - crop_h[first] + 1, tf.float32)), tf.int32
    )
    left = tf.cast(
        tf.floor(draws[3, first] * tf.cast(width - crop_w[first] + 1, tf.float32)), tf.int32
    )
    sampled = (
        tf.minimum(top, height - crop_h[first]),
        tf.minimum(left, width - crop_w[first]),
        crop_h[first],
        crop_w[first],
    )
    ratio = w / h
    fallback_h = tf.where(
        ratio < RATIO[0], tf.cast(tf.round(w / RATIO[0]), tf.int32), tf.cast(height, tf.int32)
    )
    fallback_w = tf.where(
        ratio > RATIO[1], tf.cast(tf.round(h * RATIO[1]), tf.int32), tf.cast(width, tf.int32)
    )
    fallback = ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
    any_fits = tf.reduce_any(fits)
    return tuple(tf.where(any_fits, s, f) for s, f in zip(sampled, fallback))


def train_crop(seed: int, epoch: int, index: int, height: int, width: int):
    """The training crop of example ``index`` (stored ``height`` x ``width``) in ``epoch``
    with ``seed``: ``(top, left, crop_height, crop_width, flipped)`` as Python values."""
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(example_seed(seed, epoch, index), 2)
    )
    window = random_resized_crop_window(height, width, crop_seed)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return tuple(int(v) for v in window) + (bool(flip),)


def _normalise(image: tf.Tensor) -> tf.Tensor:
    mean, std = tf.constant(MEAN, tf.float32), tf.constant(STD, tf.float32)
    return (image / 255.0 - mean) / std


def preprocess_train(jpeg: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Random-resized crop (decoded from the JPEG's window only), resize to
    ``image_size`` square, flip with p = 0.5, normalise: float32 (S, S, 3)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(jpeg)
    top, left, crop_h, crop_w = random_resized_crop_window(shape[0], shape[1], crop_seed)
    image = tf.image.decode_and_crop_jpeg(
        jpeg, tf.stack([top, left, crop_h, crop_w]), channels=3, dct_method=DCT_METHOD
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = _normalise(image)
    image.set_shape([image_size, image_size, 3])
    return image


def preprocess_eval(jpeg: tf.Tensor, image_size: int, resize: int | None = None) -> tf.Tensor:
    """Resize the shorter side to ``resize`` (default ``eval_resize_size``), centre crop
    ``image_size`` square, normalise: float32 (S, S, 3)."""
    resize = eval_resize_size(image_size) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"ImageNet: eval resize {resize} is smaller than the crop {image_size}")
    image = tf.io.decode_jpeg(jpeg, channels=3, dct_method=DCT_METHOD)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(height, width)
    # torchvision: the longer side is int(size * long / short), in Python floats.
    scaled = lambda side: tf.cast(
        tf.cast(resize, tf.float64) * tf.cast(side, tf.float64) / tf.cast(short, tf.float64),
        tf.int32,
    )
    new_h = tf.where(height == short, resize, scaled(height))
    new_w = tf.where(width == short, resize, scaled(width))
    image = tf.cond(
        (new_h == height) & (new_w == width),
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True),
    )
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    image = image[top : top + image_size, left : left + image_size]
    image = _normalise(image)
    image.set_shape([image_size, image_size, 3])
    return image


# ---------------------------------------------------------------------------
# The pipeline.


class ImageNetDataset(common.EpochDataset):
    """One epoch of dict batches (numpy). ``len()`` is the number of batches.

    Batches: ``image`` float32 (B, S, S, 3), ImageNet-normalised; ``label`` int32 (B,) in
    0..999 (TFDS's class index); ``index`` int64 (B,), the example's position in its
    prepared split (``ImageNetSource.file_name`` names its JPEG).
    """

    def __init__(self, source, split: str, batch_size: int, options: common.EpochOptions):
        self._records = source.records(split)
        super().__init__(len(self._records), split, batch_size, options, "ImageNet make_dataset")
        self.image_size, self._eval_resize = source.image_size, source.eval_resize

    def _read(self, position):
        example = self._records[int(position)]
        return np.asarray(example["image"], dtype=object), np.int32(example["label"])

    def as_tf_dataset(self) -> tf.data.Dataset:
        size = self.image_size

        def load(position):
            jpeg, label = tf.numpy_function(
                self._read, [position], [tf.string, tf.int32], stateful=False
            )
            jpeg.set_shape(())
            label.set_shape(())
            if self.options.augment:
                seed = example_seed(self.options.seed, self.options.epoch, position)
                image = preprocess_train(jpeg, seed, size)
            else:
                image = preprocess_eval(jpeg, size, self._eval_resize)
            return {"image": image, "label": label, "index": position}

        ds = tf.data.Dataset.from_tensor_slices(self.order.astype(np.int64))
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return self.batched(ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        iterator = self.as_tf_dataset().as_numpy_iterator()
        step = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as error:
                first = self.order[step * self.batch_size] if len(self.order) else 0
                raise DataError(
                    f"ImageNet {self.split!r}: reading batch {step} (examples from position "
                    f"{first}) failed ({type(error).__name__}: {_one_line(error)})"
                ) from None
            yield batch
            step += 1


class ImageNetSource:
    """A prepared ImageNet builder: ``dataset(split, batch_size, ...)`` makes epochs of
    it (the keywords of ``common``'s contract). ``image_size``: the side of the square
    crops (224); ``eval_resize``: the shorter side before the evaluation crop (default
    ``eval_resize_size(image_size)``, 256 for 224). Build one from a folder with
    ``open_source``; from any ``imagenet2012`` builder (e.g. TFDS's mock data) directly.
    """

    def __init__(
        self,
        builder: tfds.core.DatasetBuilder,
        *,
        image_size: int = 224,
        eval_resize: int | None = None,
    ):
        if image_size < 1:
            raise ValueError(f"ImageNet: image_size must be >= 1, got {image_size}")
        self.builder, self.image_size = builder, image_size
        self.eval_resize = eval_resize_size(image_size) if eval_resize is None else eval_resize
        if self.eval_resize < image_size:
            raise ValueError(
                f"ImageNet: eval_resize {self.eval_resize} is smaller than image_size {image_size}"
            )
        self._records = {}

    def records(self, split: str):
        """Random access to ``split``'s examples, JPEG bytes undecoded."""
        split = canonical_split(split)
        if split not in self._records:
            self._records[split] = self.builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        return self._records[split]

    def num_examples(self, split: str) -> int:
        return len(self.records(split))

    def file_name(self, split: str, index: int) -> str:
        """The JPEG's name in the archive of the example at position ``index``."""
        name = self.records(split)[int(index)]["file_name"]
        name = name.item() if isinstance(name, np.ndarray) else name
        return name.decode() if isinstance(name, bytes) else str(name)

    def dataset(self, split: str, batch_size: int, **options) -> ImageNetDataset:
        """One epoch of ``split``; ``options`` are ``common.EpochOptions``' keywords."""
        split = canonical_split(split)
        return ImageNetDataset(
            self, split, batch_size, common.EpochOptions(**options).resolve(split)
        )


def open_source(
    data_dir: str | Path,
    *,
    image_size: int = 224,
    eval_resize: int | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> ImageNetSource:
    """Check ``data_dir``'s archives, prepare them once (``prepare``), return the source."""
    builder = prepare(data_dir, cache_dir=cache_dir, verbose=verbose)
    return ImageNetSource(builder, image_size=image_size, eval_resize=eval_resize)


def make_dataset(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    image_size: int = 224,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
    **keywords,
) -> ImageNetDataset:
    """One epoch of ``split`` ("train", "validation" or its alias "val") from the
    archives in ``data_dir`` (module docstring); ``keywords`` as ``ImageNetSource.dataset``.
    Checks the folder each call: a run opens a source once instead."""
    source = open_source(data_dir, image_size=image_size, cache_dir=cache_dir, verbose=verbose)
    return source.dataset(split, batch_size, **keywords)


# ---------------------------------------------------------------------------
# Built-in data: tiny archives in the real format.


def fake_colour(label: int) -> np.ndarray:
    """The mean RGB colour (0..255) of ``write_fake_imagenet``'s images of class ``label``."""
    return np.random.default_rng([int(label), 0xC0105]).uniform(50.0, 205.0, 3)


def _jpeg(pixels: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(pixels, quality=95).numpy()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


_VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"


def write_fake_imagenet(
    root: str | Path,
    *,
    num_train: int = 64,
    num_val: int = 16,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, str]]:
    """Write ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into ``root``
    (new or empty) in the real layout; returns ``{split: {file name: synset}}``.

    Validation: ``ILSVRC2012_val_00000001.JPEG`` .. ``num_val``, whose synsets are the
    first lines of TFDS's ``validation_labels.txt`` (the builder labels the sorted names
    by its lines). Training: the distinct synsets among those, ``ceil(num_train /
    synsets)`` images each, as inner archives ``nXXXXXXXX.tar`` of
    ``nXXXXXXXX_k.JPEG``. Each image (``height`` x ``width``) is its class's colour
    (``fake_colour``) with a brighter band at a random place and pixel noise, so classes
    can be learnt and crops and flips change the pixels.
    """
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root}: not an empty folder; write_fake_imagenet only writes into a new or empty one"
        )
    if num_val < 1 or num_train < 1 or height < 8 or width < 8:
        raise ValueError(
            "write_fake_imagenet: num_train and num_val must be >= 1 and the images at least 8x8"
        )
    root.mkdir(parents=True, exist_ok=True)
    classes = {name: i for i, name in enumerate(synsets())}
    val_synsets = validation_synsets()[:num_val]
    train_synsets = sorted(set(val_synsets))
    per_synset = -(-num_train // len(train_synsets))
    rng = np.random.default_rng(seed)

    def image(synset: str) -> bytes:
        pixels = fake_colour(classes[synset]) + rng.normal(0.0, 12.0, (height, width, 3))
        column = int(rng.integers(0, width - width // 4))
        pixels[:, column : column + width // 4] += 40.0
        return _jpeg(np.clip(np.round(pixels), 0, 255).astype(np.uint8))

    written: dict[str, dict[str, str]] = {"train": {}, "validation": {}}
    with tarfile.open(root / ARCHIVES["train"], "w") as train:
        for synset in train_synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as members:
                for k in range(1, per_synset + 1):
                    name = f"{synset}_{k}.JPEG"
                    _add(members, name, image(synset))
                    written["train"][name] = synset
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(root / ARCHIVES["validation"], "w") as val:
        for i, synset in enumerate(val_synsets, start=1):
            name = _VAL_NAME.format(i)
            _add(val, name, image(synset))
            written["validation"][name] = synset
    return written
