"""UTKFace from the folder of JPEGs users download, into seeded tf.data pipelines.

On disk: one folder of files named ``{age}_{gender}_{race}_{datetime}.jpg`` (the
"in-the-wild" release) or ``{age}_{gender}_{race}_{datetime}.jpg.chip.jpg`` (the aligned
& cropped release, 200x200); both may be mixed. ``gender`` is 0/1, ``race`` 0..4 (the
5 ethnicity classes). Other files (a handful of real UTKFace names lack a field) are
skipped with one line on stderr that says how many and names one; subfolders are ignored.

Labels (``dgr_jax.tasks.UTKFACE``): ``age`` binned into 7 classes (0-9, 10-19, ..., 50-59,
60+), ``gender`` (2), ``ethnicity`` (5, the race field).

Split: no official one. The matching files are sorted by name, permuted with
``np.random.default_rng(SPLIT_SEED)``, and the first ``floor(0.8 n)`` form "train", the
rest "test" ("val" is an alias of "test"). The split depends on the set of matching
files only, not on the listing order; adding or removing files changes it.

Reading: the file list of this epoch's order (``common.epoch_order``; shuffled for
"train" only) goes through ``tf.io.read_file`` / ``tf.io.decode_jpeg`` (3 channels),
a bilinear antialiased resize to ``image_size`` x ``image_size`` (no aspect ratio kept;
the aligned faces are square), scaling to [0, 1] and ImageNet normalisation. Augmentation
(``augment=True``) is a horizontal flip with p = 0.5 from stateless random numbers seeded
by (seed, epoch, the example's index in the sorted file list), so it does not depend on
``start_step``, sharding or batch size. The data folder is only read.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from data_pipelines import common
from data_pipelines.common import DataError

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test")
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}
NUM_AGE_BINS = 7  # 0-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60+
NUM_GENDERS = 2
NUM_RACES = 5
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LABEL_KEYS = ("age", "gender", "ethnicity")

_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.jpg(?:\.chip\.jpg)?$", re.IGNORECASE)


def age_bin(age: int | np.ndarray) -> int | np.ndarray:
    """Age in years -> class: ``min(age // 10, 6)`` (0-9 -> 0, ..., 50-59 -> 5, 60+ -> 6)."""
    if isinstance(age, (int, np.integer)):
        return min(int(age) // 10, NUM_AGE_BINS - 1)
    return np.minimum(np.asarray(age) // 10, NUM_AGE_BINS - 1)


def parse_name(name: str) -> tuple[int, int, int] | None:
    """``(age_years, gender, race)`` from a UTKFace file name, or None if it doesn't match."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def list_examples(data_dir: str | Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    """All matching files of ``data_dir``, sorted by name, and their labels.

    Returns ``(paths, labels)``: ``labels`` holds int32 arrays of ``len(paths)``: ``age``
    (bin 0..6), ``gender`` (0..1), ``ethnicity`` (0..4) and ``age_years``. Raises
    DataError (naming the path) for a missing folder, a folder without matching files
    or a name with gender / race out of range.
    """
    folder = common.require_dir(data_dir, "UTKFace data")
    paths, ages, genders, races = [], [], [], []
    skipped, subfolders = [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.is_dir():
            subfolders.append(path)
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            skipped.append(path.name)
            continue
        age, gender, race = parsed
        if gender >= NUM_GENDERS:
            raise DataError(f"{path}: gender {gender} in the file name, expected 0 or 1")
        if race >= NUM_RACES:
            raise DataError(f"{path}: race {race} in the file name, expected 0..{NUM_RACES - 1}")
        paths.append(path)
        ages.append(age)
        genders.append(gender)
        races.append(race)
    if not paths:
        hint = ""
        if subfolders:
            hint = f"; it has subfolders (e.g. {subfolders[0].name}): point data_dir at the folder holding the .jpg files"
        raise DataError(
            f"{folder}: no UTKFace images named {{age}}_{{gender}}_{{race}}_{{datetime}}.jpg[.chip.jpg] "
            f"({len(skipped)} other files){hint}"
        )
    if skipped:
        print(
            f"note: {folder}: skipped {len(skipped)} file(s) not named {{age}}_{{gender}}_{{race}}_{{datetime}}.jpg"
            f"[.chip.jpg], e.g. {skipped[0]!r}",
            file=sys.stderr,
            flush=True,
        )
    ages_years = np.asarray(ages, np.int64)
    labels = {
        "age": age_bin(ages_years).astype(np.int32),
        "gender": np.asarray(genders, np.int32),
        "ethnicity": np.asarray(races, np.int32),
        "age_years": ages_years.astype(np.int32),
    }
    return paths, labels


def canonical_split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise ValueError(f"UTKFace: unknown split {split!r}; choose from {tuple(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[split]


def split_indices(num_examples: int, split: str) -> np.ndarray:
    """Indices (into the sorted file list, ascending) of ``split``'s examples."""
    split = canonical_split(split)
    permutation = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    num_train = int(num_examples * TRAIN_FRACTION)
    chosen = permutation[:num_train] if split == "train" else permutation[num_train:]
    return np.sort(chosen)


def _flip_key(seed: int, epoch: int) -> int:
    """One int64 from (seed, epoch): the first half of every example's stateless seed."""
    return int(
        np.random.SeedSequence([int(seed), int(epoch), 0xF11B]).generate_state(1, np.uint32)[0]
    )


def _flip_flag(key: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    seed = tf.stack([tf.cast(key, tf.int64), tf.cast(index, tf.int64)])
    return tf.random.stateless_uniform([], seed=seed) < 0.5


def flip_flags(indices: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Whether ``augment=True`` flips the examples ``indices`` (into the sorted file list)
    in epoch ``epoch`` with ``seed``: bool (len(indices),)."""
    key = tf.constant(_flip_key(seed, epoch), tf.int64)
    return np.array(
        [bool(_flip_flag(key, tf.constant(int(i), tf.int64))) for i in indices], dtype=bool
    )


def _one_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}", "", text)  # TF's node prefix says nothing here
    return " ".join(text.split())[:300]


class UTKFaceDataset:
    """One epoch of dict batches (numpy arrays). ``len()`` is the number of batches left
    after ``start_step``.

    Batches: ``image`` float32 (B, S, S, 3), ImageNet-normalised ((x - mean) / std with x
    in [0, 1], S = ``image_size``); ``age`` int32 (B,) in 0..6, ``gender`` int32 (B,) in
    0..1, ``ethnicity`` int32 (B,) in 0..4. ``files`` / ``indices``: the paths and their
    indices into ``list_examples``' list, in the order they are yielded.
    """

    def __init__(
        self,
        data_dir: Path,
        paths: Sequence[Path],
        labels: dict[str, np.ndarray],
        split: str,
        batch_size: int,
        *,
        augment: bool,
        seed: int,
        epoch: int,
        start_step: int,
        image_size: int,
        drop_remainder: bool,
        shuffle: bool,
        process_index: int | None,
        process_count: int | None,
    ):
        if image_size < 1:
            raise ValueError(f"UTKFace make_dataset: image_size must be >= 1, got {image_size}")
        self.data_dir, self.split, self.batch_size, self.image_size = (
            data_dir,
            split,
            batch_size,
            image_size,
        )
        members = split_indices(len(paths), split)
        if len(members) == 0:
            raise DataError(
                f"{data_dir}: the {split!r} split of {len(paths)} UTKFace image(s) is empty"
            )
        self.indices = members[
            common.plan_epoch(
                len(members),
                batch_size,
                seed=seed,
                epoch=epoch,
                start_step=start_step,
                shuffle=shuffle,
                drop_remainder=drop_remainder,
                process_index=process_index,
                process_count=process_count,
                where="UTKFace make_dataset",
            )
        ]
        self.files = [paths[i] for i in self.indices]
        self._labels = {key: labels[key][self.indices] for key in LABEL_KEYS}
        self._augment, self._key, self._drop_remainder = (
            augment,
            _flip_key(seed, epoch),
            drop_remainder,
        )

    def __len__(self) -> int:
        return common.batches_per_epoch(len(self.indices), self.batch_size, self._drop_remainder)

    def as_tf_dataset(self) -> tf.data.Dataset:
        size, augment = self.image_size, self._augment
        key = tf.constant(self._key, tf.int64)
        mean, std = tf.constant(MEAN, tf.float32), tf.constant(STD, tf.float32)

        def load(path, index, labels):
            image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
            image = tf.cast(image, tf.float32) / 255.0
            image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
            image = (image - mean) / std
            if augment:
                image = tf.cond(
                    _flip_flag(key, index), lambda: tf.reverse(image, axis=[1]), lambda: image
                )
            image.set_shape([size, size, 3])
            return {"image": image, **labels}

        ds = tf.data.Dataset.from_tensor_slices(
            (
                [str(p) for p in self.files] if self.files else tf.constant([], tf.string),
                self.indices.astype(np.int64),
                {name: value.astype(np.int32) for name, value in self._labels.items()},
            )
        )
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=self._drop_remainder)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _explain(self, step: int, error: tf.errors.OpError) -> DataError:
        """A DataError naming the file behind a failed batch (checked one by one, eagerly)."""
        batch = self.files[step * self.batch_size : (step + 1) * self.batch_size]
        for path in batch:
            if not path.is_file():
                return DataError(f"{path}: UTKFace image disappeared or is not a file")
            try:
                tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3)
            except (tf.errors.OpError, ValueError) as bad:
                return DataError(
                    f"{path}: unreadable JPEG ({type(bad).__name__}: {_one_line(bad)})"
                )
        names = f"{batch[0]} .. {batch[-1].name}" if batch else str(self.data_dir)
        return DataError(
            f"{names}: reading batch {step} of UTKFace {self.split!r} failed "
            f"({type(error).__name__}: {_one_line(error)})"
        )

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        iterator = self.as_tf_dataset().as_numpy_iterator()
        step = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as error:
                raise self._explain(step, error) from None
            yield batch
            step += 1


class UTKFaceSource:
    """A listed UTKFace folder: ``dataset(split, batch_size, ...)`` makes epochs of it
    without listing the folder again (``make_dataset`` takes the same keywords)."""

    def __init__(self, data_dir: str | Path, *, image_size: int = 64):
        self.data_dir = common.require_dir(data_dir, "UTKFace data")
        self.image_size = image_size
        self.paths, self.labels = list_examples(self.data_dir)

    def dataset(
        self,
        split: str,
        batch_size: int,
        *,
        augment: bool | None = None,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        drop_remainder: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> UTKFaceDataset:
        split = canonical_split(split)
        return UTKFaceDataset(
            self.data_dir,
            self.paths,
            self.labels,
            split,
            batch_size,
            augment=common.default_augment(split, augment),
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            image_size=self.image_size,
            drop_remainder=drop_remainder,
            shuffle=split == "train",
            process_index=process_index,
            process_count=process_count,
        )


def make_dataset(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    augment: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    image_size: int = 64,
    drop_remainder: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> UTKFaceDataset:
    """One epoch of UTKFace ``split`` ("train", "test" or its alias "val") from ``data_dir``.

    Yields dict batches of numpy arrays: ``image`` float32 (B, image_size, image_size, 3),
    ImageNet-normalised; ``age`` (0..6), ``gender`` (0..1), ``ethnicity`` (0..4) int32 (B,).
    "train" is shuffled by ``(seed, epoch)`` (``common.epoch_order``), "test" keeps file
    name order; ``start_step`` skips the first batches of the epoch exactly; a short last
    batch is kept (as PyTorch's data loader keeps it) unless ``drop_remainder``. This
    process reads its shard (``jax.process_index()`` of ``jax.process_count()`` unless
    given); with ``drop_remainder`` every process yields the same number of batches.
    ``augment`` (default: the training split): random horizontal flip, p = 0.5, seeded by
    (seed, epoch, example) (``flip_flags``). A file that fails to decode raises DataError
    naming it when its batch is reached. Lists the folder each call: a run opens a
    ``UTKFaceSource`` once instead.
    """
    return UTKFaceSource(data_dir, image_size=image_size).dataset(
        split,
        batch_size,
        augment=augment,
        seed=seed,
        epoch=epoch,
        start_step=start_step,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
    )


open_source = UTKFaceSource


def write_fake_utkface(root: str | Path, num: int, seed: int = 0, size: int = 48) -> list[Path]:
    """Write ``num`` small random JPEGs with valid UTKFace names into ``root`` (new or
    empty), for tests and demos; returns their paths.

    Ages 0..116, gender 0..1, race 0..4 at random. Each image is a label-dependent colour
    (red: age, green: gender, blue: race) plus random noise, so a model can learn the
    labels and a flipped image differs from the original. Odd-numbered files use the
    aligned & cropped suffix ``.jpg.chip.jpg``, even ones plain ``.jpg``.
    """
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root}: not an empty folder; write_fake_utkface only writes into a new or empty one"
        )
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(num):
        age, gender, race = (
            int(rng.integers(0, 117)),
            int(rng.integers(0, 2)),
            int(rng.integers(0, 5)),
        )
        colour = np.array([40 + 1.5 * age, 60 + 120 * gender, 30 + 45 * race])
        pixels = colour + rng.normal(0.0, 25.0, size=(size, size, 3))
        pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        suffix = ".jpg.chip.jpg" if i % 2 else ".jpg"
        path = root / f"{age}_{gender}_{race}_{20170101000000000 + i}{suffix}"
        tf.io.write_file(str(path), tf.io.encode_jpeg(pixels, quality=95))
        written.append(path)
    return written
