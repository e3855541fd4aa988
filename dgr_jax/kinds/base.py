"""What a task kind is: its losses, output activation, metric statistics and headline.

A kind is a :class:`TaskKind` record of pure functions; ``dgr_jax.tasks.Task`` names
its kind and everything else (the train step's loss, the heads' output activation,
whole-set metrics, the paper's per-batch convention, Δm's direction, benchmark data)
dispatches through the record. Adding a kind is one module in ``dgr_jax/kinds/``.

Metric statistics are sums over batches (pytrees of arrays), so the metric of a whole
set never averages per-batch metrics; ``batch_mean_sum`` / ``batch_examples`` keep the
paper's per-batch running mean beside them (``dgr_jax.metrics``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from dgr_jax.tasks import Task

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Stats = dict[str, jax.Array]


class TaskKind(NamedTuple):
    """One kind of task.

    ``losses``: name -> ``factory(task) -> loss(prediction, target) -> scalar``; the first
    is the default (the original code's). ``activation``: applied by the heads to the
    task's output (None: raw logits/values). ``headline``: the paper's one metric of the
    kind and ``lower_is_better`` (the ``l_t = 1`` of Δm). ``init_stats(task)``,
    ``update_stats(task, stats, prediction, target)`` (jit-able) and
    ``finalize(task, stats) -> {metric: float}`` (host side) give the whole-set metrics;
    ``paper_value(task, stats)`` the headline in the paper's convention.
    ``example_target(task, rng, batch, height, width)``: a numpy target of the right
    shape, dtype and invalid values (benchmarks, tests).
    """

    name: str
    losses: Mapping[str, Callable[["Task"], LossFn]]
    headline: str
    lower_is_better: bool
    init_stats: Callable[["Task"], Stats]
    update_stats: Callable[["Task", Stats, jax.Array, jax.Array], Stats]
    finalize: Callable[["Task", Mapping[str, Any]], dict[str, float]]
    paper_value: Callable[["Task", Mapping[str, Any]], float]
    example_target: Callable[..., np.ndarray]
    activation: Callable[[jax.Array], jax.Array] | None = None


# ---------------------------------------------------------------------------
# Helpers the kinds share


def masked_mean(values, mask):
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sum_dtype():
    return jnp.result_type(float)  # float32, or float64 under jax_enable_x64


def count(mask) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.int32)


def batch_mean_stats() -> Stats:
    """The paper's convention: sum over batches of (examples in the batch) x (batch mean)."""
    return {
        "batch_mean_sum": jnp.zeros((), sum_dtype()),
        "batch_examples": jnp.zeros((), jnp.int32),
    }


def add_batch_mean(stats, values, mask, num_examples: int) -> Stats:
    """Add ``num_examples * mean(values[mask])`` (NaN when the batch has no valid element,
    as the original's ``torch.mean`` of an empty selection)."""
    dtype = stats["batch_mean_sum"].dtype
    mean = jnp.sum(jnp.where(mask, values, 0), dtype=dtype) / jnp.sum(mask, dtype=dtype)
    return {
        "batch_mean_sum": stats["batch_mean_sum"] + num_examples * mean,
        "batch_examples": stats["batch_examples"] + jnp.int32(num_examples),
    }


def batch_mean_value(task, stats) -> float:
    return ratio(np.asarray(stats["batch_mean_sum"]), np.asarray(stats["batch_examples"]))


def ratio(numerator, denominator) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def check_shapes(task, prediction, target, expected_prediction: tuple[int, ...]) -> None:
    # Shapes are static, so this runs at trace time and costs nothing under jit.
    if prediction.shape != expected_prediction:
        raise ValueError(
            f"metrics: task {task.name!r} ({task.kind}): prediction shape {prediction.shape} "
            f"does not fit target shape {target.shape} (expected {expected_prediction})"
        )


def balanced_binary_cross_entropy(logits, labels, invalid, pos_weight: float | None = None):
    """Class-balanced binary cross-entropy (HED's, as ASTMT / MTI-Net train saliency and
    edges with): ``[w sum_pos bce + (1 - w) sum_neg bce] / n`` over the ``n`` pixels whose
    label is not ``invalid``, ``w`` the fraction of negative pixels (``pos_weight=None``)
    or a constant (edges: 0.95). ``logits`` ``(..., 1)``, ``labels`` ``(...)`` in {0, 1}.
    The originals divide by every pixel, ignored ones included; here ignored pixels (the
    padding of a crop) are left out of both sums and of ``n``."""
    logits = logits[..., 0]
    valid = labels != invalid
    positive = (labels == 1) & valid
    negative = valid & ~positive
    dtype = logits.dtype
    n = jnp.maximum(jnp.sum(valid, dtype=dtype), 1.0)
    if pos_weight is None:
        weight = jnp.sum(negative, dtype=dtype) / n
    else:
        weight = jnp.asarray(pos_weight, dtype)
    loss_pos = jnp.sum(jnp.where(positive, jax.nn.softplus(-logits), 0))
    loss_neg = jnp.sum(jnp.where(negative, jax.nn.softplus(logits), 0))
    return (weight * loss_pos + (1.0 - weight) * loss_neg) / n
