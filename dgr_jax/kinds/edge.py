"""Edges (binary boundary maps): logits ``(..., 1)``, labels ``(...)`` in {0, 1} with
``task.invalid`` (-1) ignored (the padding of an evaluation canvas).

Loss: class-balanced binary cross-entropy with the positives' weight fixed at
``POS_WEIGHT`` = 0.95 (ASTMT / MTI-Net).

Metric: ``odsf``, the F-measure at the optimal dataset scale (one threshold for the whole
set), with the matching tolerance of the literature's SEISM evaluation on PASCAL-Context,
``MAX_DIST`` = 0.0075 of the image diagonal (``r = 0.0075 * sqrt(H^2 + W^2)`` pixels of
the evaluated array). At each threshold ``t = k / 100`` (k = 1..99) on
``sigmoid(logit)``, a predicted edge pixel is correct when a ground-truth edge pixel lies
within distance ``r`` of it, and a ground-truth pixel is recalled when a predicted one
lies within ``r``. This is our implementation, not the BSDS / SEISM benchmark: that one
thins the predictions at every threshold and matches pixels one to one (a bipartite
assignment per image and threshold, which ``pyedgeeval`` runs on the host in hours for
the 5105 validation images); ours is a tolerance match without thinning, jit-able and
exact for its definition, so thick predictions are not penalised and its odsF is an
upper bound of the benchmark's at the same tolerance. Counts are histograms over
``BINS`` probability bins, summed over the whole set: the predictions' bins over all
pixels and over pixels within ``r`` of the truth, and the bin of the largest prediction
within ``r`` of each ground-truth pixel. ``ods_threshold`` is the optimal ``t``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.kinds.base import TaskKind, balanced_binary_cross_entropy, check_shapes

POS_WEIGHT = 0.95
MAX_DIST = 0.0075
BINS = 100  # probability bins of width 0.01; thresholds k / 100, k = 1..99


def balanced_bce(task):
    def loss(logits, labels):
        return balanced_binary_cross_entropy(logits, labels, task.invalid, POS_WEIGHT)

    return loss


def tolerance(height: int, width: int) -> float:
    """The matching radius in pixels for a ``height x width`` map."""
    return MAX_DIST * math.hypot(height, width)


def disc_max(x: jax.Array, radius: float) -> jax.Array:
    """The largest value of ``x`` ``(B, H, W)`` (non-negative) within Euclidean distance
    ``radius`` of each pixel (zero outside the map)."""
    reach = int(math.floor(radius))
    height, width = x.shape[1:]
    padded = jnp.pad(x, ((0, 0), (reach, reach), (reach, reach)))
    out = jnp.zeros_like(x)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx <= radius * radius:
                shifted = padded[
                    :, reach + dy : reach + dy + height, reach + dx : reach + dx + width
                ]
                out = jnp.maximum(out, shifted)
    return out


def init_stats(task):
    zeros = jnp.zeros((BINS,), jnp.int32)
    return {
        "predicted": zeros,
        "predicted_matched": zeros,
        "truth_matched": zeros,
        "truth": jnp.zeros((), jnp.int32),
    }


def _histogram(bins, mask):
    bins = jnp.where(mask, bins, BINS).reshape(-1)  # out of bounds: dropped
    return jnp.zeros((BINS,), jnp.int32).at[bins].add(1, mode="drop")


def update_stats(task, stats, logits, labels):
    check_shapes(task, logits, labels, labels.shape + (1,))
    radius = tolerance(*labels.shape[1:3])
    valid = labels != task.invalid
    truth = (labels == 1) & valid
    probability = jnp.where(valid, jax.nn.sigmoid(logits[..., 0].astype(jnp.float32)), 0.0)
    bins = jnp.clip(jnp.floor(probability * BINS), 0, BINS - 1).astype(jnp.int32)
    near_truth = disc_max(truth.astype(jnp.float32), radius) > 0
    nearest_bins = jnp.clip(jnp.floor(disc_max(probability, radius) * BINS), 0, BINS - 1)
    return {
        "predicted": stats["predicted"] + _histogram(bins, valid),
        "predicted_matched": stats["predicted_matched"] + _histogram(bins, valid & near_truth),
        "truth_matched": stats["truth_matched"] + _histogram(nearest_bins.astype(jnp.int32), truth),
        "truth": stats["truth"] + jnp.sum(truth, dtype=jnp.int32),
    }


def precision_recall(stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at the thresholds ``k / 100``, k = 1..99 (and the thresholds)."""

    def at_least(histogram):  # counts with bin >= k, k = 1..BINS - 1
        return np.cumsum(np.asarray(histogram, np.int64)[::-1])[::-1][1:]

    predicted, matched = at_least(stats["predicted"]), at_least(stats["predicted_matched"])
    recalled, truth = at_least(stats["truth_matched"]), int(np.asarray(stats["truth"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, matched / np.maximum(predicted, 1), 1.0)
        recall = recalled / truth if truth > 0 else np.full(precision.shape, math.nan)
    return precision, recall, np.arange(1, BINS) / BINS


def finalize(task, stats):
    precision, recall, thresholds = precision_recall(stats)
    if np.all(np.isnan(recall)):
        return {"odsf": math.nan, "ods_threshold": math.nan}
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f))
    return {"odsf": float(f[best]), "ods_threshold": float(thresholds[best])}


def paper_value(task, stats):
    return finalize(task, stats)["odsf"]


def example_target(task, rng, batch, height, width):
    labels = (rng.uniform(size=(batch, height, width)) < 0.05).astype(np.int32)
    labels[:, :, -max(1, width // 8) :] = task.invalid
    return labels


KIND = TaskKind(
    name="edge",
    losses={"balanced_bce": balanced_bce},
    headline="odsf",
    lower_is_better=False,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=paper_value,
    example_target=example_target,
)
