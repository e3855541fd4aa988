"""Shared pieces of the input pipelines: one-line data errors, file checks, the cache
folder, per-process shards and seeded epoch orders.

Every pipeline in this package follows the same contract:

* ``make_dataset(data_dir, split, batch_size, *, augment, seed, epoch=0, start_step=0,
  ...)`` returns an iterable of dict batches of numpy arrays; iterating it once is one
  epoch (the order depends on ``seed`` and ``epoch`` only), and ``start_step`` skips the
  first batches of that epoch exactly (resume).
* A process reads only its shard (``shard_indices``), a contiguous, even split of the
  examples by ``jax.process_index()``; the global batch is the per-process batches
  side by side.
* The user's data folder is only ever read. Anything prepared from it goes under
  ``cache_root()``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


class DataError(ValueError):
    """A problem with a data folder or file; the message is one line naming the path."""


def cache_root() -> Path:
    """Where prepared data goes: ``$DGR_JAX_CACHE``, else ``~/.cache/dgr_jax``."""
    return Path(os.environ.get("DGR_JAX_CACHE", Path.home() / ".cache" / "dgr_jax")).expanduser()


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: {what} folder does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: {what} is not a folder")
    return path


def load_npy(path: Path, *, shape: Sequence[int | None] | None = None, kind: str | None = None) -> np.ndarray:
    """``np.load`` with one-line errors naming ``path``.

    ``shape``: expected shape (``None`` entries match anything). ``kind``: expected
    numpy dtype kind(s), e.g. ``"f"`` or ``"iuf"``.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError
        raise DataError(f"{path}: unreadable .npy file ({type(error).__name__}: {error})") from None
    if shape is not None and (array.ndim != len(shape)
                              or any(e is not None and e != a for e, a in zip(shape, array.shape))):
        wanted = "x".join("*" if e is None else str(e) for e in shape)
        raise DataError(f"{path}: shape {array.shape}, expected {wanted}")
    if kind is not None and array.dtype.kind not in kind:
        raise DataError(f"{path}: dtype {array.dtype}, expected kind {kind!r} "
                        f"({', '.join({'f': 'float', 'i': 'int', 'u': 'uint', 'b': 'bool'}[k] for k in kind)})")
    return array


def process_info() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``; (0, 1) where JAX is absent."""
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return 0, 1
    return jax.process_index(), jax.process_count()


def shard_indices(num_examples: int, process_index: int | None = None,
                  process_count: int | None = None) -> np.ndarray:
    """This process's examples: a contiguous, even split of ``range(num_examples)``
    (sizes differ by at most one, as ``tfds.even_splits``)."""
    if process_index is None or process_count is None:
        process_index, process_count = process_info()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
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
        raise ValueError(f"{where}: start_step must be in [0, {num_steps}] (batches in this epoch), got {start_step}")
