"""MultiDigits: two real handwritten digits side by side, one task per digit.

Source: scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 images,
8x8, values 0..16, shipped with the package; nothing is downloaded). They are split once
into train / test source digits (a fixed permutation with ``SOURCE_SPLIT_SEED``; the first
``floor(0.8 * 1797)`` = 1437 train, the other 360 test), so test pairs are made of digits
never seen in training.

A pair: a canvas of ``height`` x ``width`` (12 x 24 by default) split into a left half
(columns ``0 .. width // 2 - 1``) and a right half (``width // 2 ..``). Each digit is
drawn (values / 16, so in [0, 1]) inside its own half, at the half's centre moved by
random integer offsets of at most ``JITTER`` = 2 pixels in each direction (clipped so it
stays inside the half; the halves never overlap). Tasks ``left`` and ``right``: the two
digits' classes (10 each).

Pairs are drawn within a split, with replacement, from ``np.random.default_rng([seed,
split])``; default counts 10000 train and 2000 test. They are built in memory (fast)
and cached per arguments.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from data_pipelines import common

SOURCE_SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
JITTER = 2
DIGIT = 8  # load_digits images are 8x8
NUM_CLASSES = 10
DEFAULT_NUM_PAIRS = {"train": 10000, "test": 2000}
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}
_SPLIT_CODES = {"train": 0, "test": 1}


def canonical_split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise ValueError(
            f"MultiDigits: unknown split {split!r}; choose from {tuple(SPLIT_ALIASES)}"
        )
    return SPLIT_ALIASES[split]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: only this data set needs it

    digits = load_digits()
    images = np.asarray(digits.images, np.float32)
    images.flags.writeable = False
    target = np.asarray(digits.target, np.int32)
    target.flags.writeable = False
    return images, target


def source_indices(split: str) -> np.ndarray:
    """Indices (ascending) into ``load_digits()`` of ``split``'s source digits."""
    split = canonical_split(split)
    images, _ = _digits()
    permutation = np.random.default_rng(SOURCE_SPLIT_SEED).permutation(len(images))
    num_train = int(len(images) * TRAIN_FRACTION)
    return np.sort(permutation[:num_train] if split == "train" else permutation[num_train:])


def _offsets(size: int) -> tuple[int, int]:
    """Smallest and largest start of an 8-pixel digit in ``size`` pixels: centre +- JITTER."""
    centre = (size - DIGIT) // 2
    return max(0, centre - JITTER), min(size - DIGIT, centre + JITTER)


@functools.lru_cache(maxsize=8)
def _build(split: str, num_pairs: int, seed: int, height: int, width: int) -> dict[str, np.ndarray]:
    images, target = _digits()
    pool = source_indices(split)
    half = width // 2
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split]])
    left_index = pool[rng.integers(0, len(pool), num_pairs)]
    right_index = pool[rng.integers(0, len(pool), num_pairs)]
    (y_lo, y_hi), (x_lo, x_hi) = _offsets(height), _offsets(half)
    left_pos = np.stack(
        [rng.integers(y_lo, y_hi + 1, num_pairs), rng.integers(x_lo, x_hi + 1, num_pairs)], -1
    )
    right_pos = np.stack(
        [rng.integers(y_lo, y_hi + 1, num_pairs), half + rng.integers(x_lo, x_hi + 1, num_pairs)],
        -1,
    )
    canvas = np.zeros((num_pairs, height, width, 1), np.float32)
    rows = np.arange(DIGIT)
    for index, pos in ((left_index, left_pos), (right_index, right_pos)):
        ys = (pos[:, 0, None] + rows)[:, :, None]  # (N, 8, 1)
        xs = (pos[:, 1, None] + rows)[:, None, :]  # (N, 1, 8)
        canvas[np.arange(num_pairs)[:, None, None], ys, xs, 0] = images[index] / 16.0
    out = {
        "image": canvas,
        "left": target[left_index].astype(np.int32),
        "right": target[right_index].astype(np.int32),
        "left_index": left_index.astype(np.int64),
        "right_index": right_index.astype(np.int64),
        "left_pos": left_pos.astype(np.int32),
        "right_pos": right_pos.astype(np.int32),
    }
    for value in out.values():
        value.flags.writeable = False  # cached: callers get read-only views
    return out


def build_pairs(
    split: str, *, num_pairs: int | None = None, seed: int = 0, height: int = 12, width: int = 24
) -> dict[str, np.ndarray]:
    """All pairs of ``split`` ("train", "test" or its alias "val"), deterministic in
    ``(split, num_pairs, seed, height, width)``.

    Returns read-only numpy arrays: ``image`` float32 (N, H, W, 1) in [0, 1]; ``left``,
    ``right`` int32 (N,) (classes 0..9); ``left_index``, ``right_index`` int64 (N,),
    indices into ``load_digits()`` of the two source digits; ``left_pos``, ``right_pos``
    int32 (N, 2): (row, column) on the canvas of each digit's top-left pixel.
    """
    split = canonical_split(split)
    num_pairs = DEFAULT_NUM_PAIRS[split] if num_pairs is None else int(num_pairs)
    if num_pairs < 1:
        raise ValueError(f"MultiDigits: num_pairs must be >= 1, got {num_pairs}")
    if height < DIGIT or width // 2 < DIGIT:
        raise ValueError(
            f"MultiDigits: canvas {height}x{width} too small; need height >= {DIGIT} "
            f"and width >= {2 * DIGIT} (an 8x8 digit in each half)"
        )
    return _build(split, num_pairs, int(seed), int(height), int(width))


class MultiDigitsDataset:
    """One epoch of dict batches (numpy arrays). ``len()`` is the number of batches left
    after ``start_step``.

    Batches: ``image`` float32 (B, H, W, 1) in [-1, 1] (2 * pixel - 1); ``left``,
    ``right`` int32 (B,). ``indices``: the pairs' rows in ``build_pairs``, in the order
    they are yielded.
    """

    def __init__(
        self,
        pairs: dict[str, np.ndarray],
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_step: int,
        drop_remainder: bool,
        shuffle: bool,
        process_index: int | None,
        process_count: int | None,
    ):
        self.batch_size = batch_size
        self.indices = common.plan_epoch(
            len(pairs["left"]),
            batch_size,
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            shuffle=shuffle,
            drop_remainder=drop_remainder,
            process_index=process_index,
            process_count=process_count,
            where="MultiDigits make_dataset",
        )
        self._pairs, self._drop_remainder = pairs, drop_remainder

    def __len__(self) -> int:
        return common.batches_per_epoch(len(self.indices), self.batch_size, self._drop_remainder)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for step in range(len(self)):
            rows = self.indices[step * self.batch_size : (step + 1) * self.batch_size]
            yield {
                "image": self._pairs["image"][rows] * np.float32(2.0) - np.float32(1.0),
                "left": self._pairs["left"][rows],
                "right": self._pairs["right"][rows],
            }


class MultiDigitsSource:
    """The built-in pairs: ``dataset(split, batch_size, ...)`` as ``make_dataset``."""

    def __init__(self, data_dir: None = None, *, num_pairs: int | None = None):
        if data_dir is not None:
            raise ValueError(
                f"MultiDigits is built from scikit-learn's digits and reads no folder; got {data_dir!r}"
            )
        self.num_pairs = num_pairs

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
    ) -> MultiDigitsDataset:
        split = canonical_split(split)
        del augment  # no augmentation (make_dataset)
        pairs = build_pairs(split, num_pairs=self.num_pairs)
        return MultiDigitsDataset(
            pairs,
            batch_size,
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            drop_remainder=drop_remainder,
            shuffle=split == "train",
            process_index=process_index,
            process_count=process_count,
        )


def make_dataset(
    data_dir: None,
    split: str,
    batch_size: int,
    *,
    augment: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    num_pairs: int | None = None,
    drop_remainder: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> MultiDigitsDataset:
    """One epoch of MultiDigits ``split`` (default canvas 12 x 24; pairs from ``build_pairs``
    with its default seed, so ``seed`` here only orders the epoch). ``data_dir`` must be
    None (the pairs are built in memory): the argument keeps the common signature.

    Yields dict batches of numpy arrays: ``image`` float32 (B, 12, 24, 1) in [-1, 1];
    ``left``, ``right`` int32 (B,). "train" is shuffled by ``(seed, epoch)``
    (``common.epoch_order``), "test" is in pair order; ``start_step`` skips the first
    batches of the epoch exactly; a short last batch is kept unless ``drop_remainder``;
    this process reads its shard (``jax.process_index()`` of ``jax.process_count()``
    unless given; with ``drop_remainder`` every process yields the same number of
    batches). ``augment`` is accepted for the common interface and does nothing: the
    pairs already carry positional jitter, and flips would change what a digit is.
    """
    return MultiDigitsSource(data_dir, num_pairs=num_pairs).dataset(
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


open_source = MultiDigitsSource
