"""Shared pieces of the input pipelines: one-line data errors, file checks, the cache
folder, per-process shards and seeded epoch orders.

Every pipeline in this package follows the same contract:

* ``make_dataset(data_dir, split, batch_size, *, augment=None, seed=0, epoch=0,
  start_step=0, drop_remainder=False, process_index=None, process_count=None)``
  returns a sized iterable of dict batches of numpy arrays; iterating it once is one
  epoch (the order depends on ``seed`` and ``epoch`` only), ``start_step`` skips the
  first batches of that epoch exactly (resume), ``augment`` defaults to True for the
  training split, and a short last batch is kept unless ``drop_remainder``.
  ``open_source(data_dir)`` checks (and prepares) the folder once and returns an object
  whose ``dataset(split, batch_size, ...)`` takes the same keywords: a run scans its
  data folder once, not every epoch.
* A process reads only its shard (``shard_indices``), a contiguous, even split of the
  examples by ``jax.process_index()``; the global batch is the per-process batches
  side by side. ``plan_epoch`` is the one place that orders, shards and batches.
* The user's data folder is only ever read. Anything prepared from it goes under
  ``cache_root()``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


class DataError(ValueError):
    """A problem with a data folder or file; the message is one line naming the path."""


def cache_root() -> Path:
    """Where prepared data goes: ``$DGR_JAX_CACHE``, else ``~/.cache/dgr_jax``."""
    return Path(os.environ.get("DGR_JAX_CACHE", Path.home() / ".cache" / "dgr_jax")).expanduser()


def write_once(root: Path, write: Callable[[Path], Any]) -> Path:
    """``root``, made the first time by ``write(folder)`` into a temporary sibling that is
    then renamed into place, so a folder that exists is complete. Processes may race: the
    first rename wins and the others' copies are removed."""
    root = Path(root)
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_name(
            f"{root.name}.tmp{os.getpid()}_{np.random.default_rng().integers(1 << 30)}"
        )
        try:
            write(tmp)
            tmp.rename(root)
        except OSError:
            if not root.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: {what} folder does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: {what} is not a folder")
    return path


def load_npy(
    path: Path, *, shape: Sequence[int | None] | None = None, kind: str | None = None
) -> np.ndarray:
    """``np.load`` with one-line errors naming ``path``.

    ``shape``: expected shape (``None`` entries match anything). ``kind``: expected
    numpy dtype kind(s), e.g. ``"f"`` or ``"iuf"``.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError
        raise DataError(f"{path}: unreadable .npy file ({type(error).__name__}: {error})") from None
    if shape is not None and (
        array.ndim != len(shape)
        or any(e is not None and e != a for e, a in zip(shape, array.shape))
    ):
        wanted = "x".join("*" if e is None else str(e) for e in shape)
        raise DataError(f"{path}: shape {array.shape}, expected {wanted}")
    if kind is not None and array.dtype.kind not in kind:
        raise DataError(
            f"{path}: dtype {array.dtype}, expected kind {kind!r} "
            f"({', '.join({'f': 'float', 'i': 'int', 'u': 'uint', 'b': 'bool'}[k] for k in kind)})"
        )
    return array


def process_info() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``; (0, 1) where JAX is absent."""
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return 0, 1
    return jax.process_index(), jax.process_count()


def shard_indices(
    num_examples: int, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """This process's examples: a contiguous, even split of ``range(num_examples)``
    (sizes differ by at most one, as ``tfds.even_splits``)."""
    if process_index is None or process_count is None:
        process_index, process_count = process_info()
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} out of range for {process_count} processes"
        )
    bounds = np.linspace(0, num_examples, process_count + 1).round().astype(int)
    return np.arange(bounds[process_index], bounds[process_index + 1])


def epoch_order(indices: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of ``indices`` in one epoch: a permutation determined by (seed, epoch)."""
    if not shuffle:
        return np.asarray(indices)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    return np.asarray(indices)[rng.permutation(len(indices))]


def batches_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def check_batch_args(batch_size: int, start_step: int, num_steps: int, where: str) -> None:
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(
            f"{where}: start_step must be in [0, {num_steps}] (batches in this epoch), got {start_step}"
        )


def plan_epoch(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int,
    shuffle: bool,
    drop_remainder: bool,
    process_index: int | None,
    process_count: int | None,
    where: str,
) -> np.ndarray:
    """Positions (into ``range(num_examples)``) this process reads in one epoch, in order,
    from batch ``start_step`` on.

    The process's shard (``shard_indices``) in the epoch's order (``epoch_order``). With
    ``drop_remainder`` the batches are counted from the smallest shard, so every process
    runs the same number of steps (shards differ by at most one example); without, a
    short last batch is kept. Raises a one-line ValueError naming ``where`` for a bad
    batch size or ``start_step``.
    """
    check_batch_args(batch_size, 0, 0, where)  # batch_size first: it divides
    if process_index is None or process_count is None:
        process_index, process_count = process_info()
    positions = shard_indices(num_examples, process_index, process_count)
    counted = num_examples // process_count if drop_remainder else len(positions)
    num_batches = batches_per_epoch(counted, batch_size, drop_remainder)
    check_batch_args(batch_size, start_step, num_batches, where)
    order = epoch_order(positions, seed, epoch, shuffle)
    return order[start_step * batch_size : min(num_batches * batch_size, len(order))]


def default_augment(split: str, augment: bool | None) -> bool:
    """``augment=None`` means: augment the training split only."""
    return split == "train" if augment is None else bool(augment)


@dataclasses.dataclass(frozen=True)
class EpochOptions:
    """The keywords of every pipeline's ``dataset(split, batch_size, **keywords)``: which
    examples one epoch reads and how (``augment`` / ``shuffle`` None: True for "train"
    only; process shard None: this process's)."""

    augment: bool | None = None
    seed: int = 0
    epoch: int = 0
    start_step: int = 0
    drop_remainder: bool = False
    shuffle: bool | None = None
    process_index: int | None = None
    process_count: int | None = None

    def resolve(self, split: str) -> "EpochOptions":
        return dataclasses.replace(
            self,
            augment=default_augment(split, self.augment),
            shuffle=split == "train" if self.shuffle is None else self.shuffle,
        )


class EpochDataset:
    """One epoch of a random-access split in ``plan_epoch``'s order, read in batches:
    ``len()`` is the number of batches; subclasses make ``as_tf_dataset`` from
    ``self.order`` (and ``batched`` ends it as every pipeline does)."""

    def __init__(
        self, num_examples: int, split: str, batch_size: int, options: EpochOptions, where: str
    ):
        self.split, self.batch_size, self.options = split, batch_size, options
        self.order = plan_epoch(
            num_examples,
            batch_size,
            seed=options.seed,
            epoch=options.epoch,
            start_step=options.start_step,
            shuffle=options.shuffle,
            drop_remainder=options.drop_remainder,
            process_index=options.process_index,
            process_count=options.process_count,
            where=where,
        )

    def __len__(self) -> int:
        return batches_per_epoch(len(self.order), self.batch_size, self.options.drop_remainder)

    def batched(self, ds):
        return ds.batch(self.batch_size, drop_remainder=self.options.drop_remainder).prefetch(-1)
