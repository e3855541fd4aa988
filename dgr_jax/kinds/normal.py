"""Surface normals: the heads output unit vectors ``(..., 3)`` (L2-normalised per pixel);
all-zero targets are invalid.

Losses: ``"l1"`` (default, the original code's): the L1 distance between unit normals,
summed over the channels, mean over pixels whose target channels do not sum to 0 (the
original's validity test); ``"cosine"``: ``1 - cos`` over pixels not all zero.

Metrics over pixels whose target is not all zero: the angle ``arccos(clip(<pred, gt>,
−1, 1))`` in degrees (a zero prediction scores 90°); ``mean_angle``; ``median_angle``
from a histogram of ``HISTOGRAM_BINS`` bins over [0°, 180°] (0.001° wide: the order
statistics are located exactly and reported at their bin's centre, within 0.0005° of
``np.median``); ``within_11.25`` / ``within_22.5`` / ``within_30``, fractions strictly
below. In float32, arccos of a rounded cosine is accurate to ~1e-5° at typical angles but
only to ~0.02° for angles under ~1°. The paper's convention averages per-batch mean
angles over pixels whose target channels do not sum to 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.kinds.base import (
    TaskKind,
    add_batch_mean,
    batch_mean_stats,
    batch_mean_value,
    check_shapes,
    count,
    masked_mean,
    ratio,
    sum_dtype,
)

HISTOGRAM_BINS = 180_000
BIN_WIDTH = 180.0 / HISTOGRAM_BINS  # degrees
THRESHOLDS = (11.25, 22.5, 30.0)  # degrees; keys "within_11.25", "within_22.5", "within_30"


def unit_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """L2-normalise the last axis; ``eps`` keeps an all-zero vector finite."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def l1(task):
    def loss(prediction, target):  # sum over channels, mean over valid pixels
        valid = jnp.sum(target, axis=-1) != 0
        return masked_mean(jnp.sum(jnp.abs(prediction - target), axis=-1), valid)

    return loss


def cosine(task):
    def loss(prediction, target):
        valid = jnp.any(target != 0, axis=-1)
        return 1.0 - masked_mean(jnp.sum(prediction * target, axis=-1), valid)

    return loss


def init_stats(task):
    return {
        "angle_sum": jnp.zeros((), sum_dtype()),
        "count": jnp.zeros((), jnp.int32),
        "histogram": jnp.zeros((HISTOGRAM_BINS,), jnp.int32),
        "within": jnp.zeros((len(THRESHOLDS),), jnp.int32),
        **batch_mean_stats(),
    }


def update_stats(task, stats, prediction, target):
    check_shapes(task, prediction, target, target.shape)
    valid = jnp.any(target != 0, axis=-1).reshape(-1)
    cosine_ = jnp.clip(jnp.sum(prediction * target, axis=-1), -1, 1)
    angle = jnp.degrees(jnp.arccos(cosine_)).reshape(-1)
    dtype = stats["angle_sum"].dtype
    bins = jnp.clip(jnp.floor(angle / BIN_WIDTH), 0, HISTOGRAM_BINS - 1).astype(jnp.int32)
    bins = jnp.where(valid, bins, HISTOGRAM_BINS)  # out of bounds: dropped
    histogram = jnp.zeros((HISTOGRAM_BINS,), jnp.int32).at[bins].add(1, mode="drop")
    below = angle[:, None] < jnp.asarray(THRESHOLDS, angle.dtype)[None, :]
    paper_valid = (jnp.sum(target, axis=-1) != 0).reshape(-1)  # the original's validity test
    return {
        "angle_sum": stats["angle_sum"] + jnp.sum(jnp.where(valid, angle, 0), dtype=dtype),
        "count": stats["count"] + count(valid),
        "histogram": stats["histogram"] + histogram,
        "within": stats["within"] + jnp.sum(below & valid[:, None], axis=0, dtype=jnp.int32),
        **add_batch_mean(stats, angle, paper_valid, target.shape[0]),
    }


def histogram_median(histogram: np.ndarray) -> float:
    cumulative = np.cumsum(histogram, dtype=np.int64)
    n = int(cumulative[-1])
    if n == 0:
        return math.nan
    # np.median: the mean of the order statistics (0-based) (n - 1) // 2 and n // 2.
    ranks = np.array([(n - 1) // 2, n // 2])
    bins = np.searchsorted(cumulative, ranks + 1)  # first bin holding more than `rank` angles
    return float(np.mean((bins + 0.5) * BIN_WIDTH))


def finalize(task, stats):
    total = int(np.asarray(stats["count"]))
    metrics = {
        "mean_angle": ratio(np.asarray(stats["angle_sum"]), total),
        "median_angle": histogram_median(np.asarray(stats["histogram"])),
    }
    for threshold, within in zip(THRESHOLDS, np.asarray(stats["within"])):
        metrics[f"within_{threshold:g}"] = ratio(within, total)
    return metrics


def example_target(task, rng, batch, height, width):
    value = rng.normal(size=(batch, height, width, 3))
    value /= np.linalg.norm(value, axis=-1, keepdims=True)
    value[rng.uniform(size=(batch, height, width)) < 0.1] = 0.0
    return value.astype(np.float32)


KIND = TaskKind(
    name="normal",
    losses={"l1": l1, "cosine": cosine},
    headline="mean_angle",
    lower_is_better=True,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=batch_mean_value,
    example_target=example_target,
    activation=unit_normalize,
)
