"""Saliency (binary, per pixel): logits ``(..., 1)``, labels ``(...)`` in {0, 1} with
``task.invalid`` (-1) ignored.

Loss: class-balanced binary cross-entropy (``base.balanced_binary_cross_entropy``, the
weight of the positives the fraction of negative pixels), as ASTMT / MTI-Net train their
distilled saliency. Metrics as the MTL literature reports them (MTI-Net's ``eval_sal``):
the prediction ``sigmoid(logit) > t`` at each of the thresholds ``THRESHOLDS``
(``linspace(0.2, 0.9, 15)``); per image the IoU with the ground truth, the precision and
the recall over its labelled pixels; ``miou`` the largest over thresholds of the mean
IoU over images, ``maxf`` the largest over thresholds of ``2 P R / (P + R)`` of the mean
precision and mean recall. An image with an empty union scores IoU 1; with no predicted
positive, precision 1 if it has no positive either, else 0; with no positive, recall 1.
Images with no labelled pixel are not counted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.kinds.base import TaskKind, balanced_binary_cross_entropy, check_shapes, sum_dtype

THRESHOLDS = tuple(float(t) for t in np.linspace(0.2, 0.9, 15))


def balanced_bce(task):
    def loss(logits, labels):
        return balanced_binary_cross_entropy(logits, labels, task.invalid)

    return loss


def init_stats(task):
    zeros = jnp.zeros((len(THRESHOLDS),), sum_dtype())
    return {
        "iou_sum": zeros,
        "precision_sum": zeros,
        "recall_sum": zeros,
        "images": jnp.zeros((), jnp.int32),
    }


def per_image_scores(probability, labels, invalid, thresholds):
    """``(iou, precision, recall)``, each ``(B, K)``, and ``counted`` ``(B,)``: the
    per-image scores at each threshold (module docstring)."""
    batch = labels.shape[0]
    valid = (labels != invalid).reshape(batch, 1, -1)
    truth = (labels == 1).reshape(batch, 1, -1) & valid
    predicted = (probability.reshape(batch, 1, -1) > jnp.asarray(thresholds)[None, :, None]) & valid
    dtype = sum_dtype()
    tp = jnp.sum(predicted & truth, axis=-1, dtype=dtype)
    fp = jnp.sum(predicted & ~truth, axis=-1, dtype=dtype)
    fn = jnp.sum(~predicted & truth, axis=-1, dtype=dtype)
    union = tp + fp + fn
    iou = jnp.where(union > 0, tp / jnp.maximum(union, 1), 1.0)
    precision = jnp.where(
        tp + fp > 0, tp / jnp.maximum(tp + fp, 1), jnp.where(tp + fn > 0, 0.0, 1.0)
    )
    recall = jnp.where(tp + fn > 0, tp / jnp.maximum(tp + fn, 1), 1.0)
    counted = jnp.any(valid, axis=(1, 2))
    return iou, precision, recall, counted


def update_stats(task, stats, logits, labels):
    check_shapes(task, logits, labels, labels.shape + (1,))
    iou, precision, recall, counted = per_image_scores(
        jax.nn.sigmoid(logits[..., 0]), labels, task.invalid, THRESHOLDS
    )
    keep = counted[:, None]
    return {
        "iou_sum": stats["iou_sum"] + jnp.sum(jnp.where(keep, iou, 0), axis=0),
        "precision_sum": stats["precision_sum"] + jnp.sum(jnp.where(keep, precision, 0), axis=0),
        "recall_sum": stats["recall_sum"] + jnp.sum(jnp.where(keep, recall, 0), axis=0),
        "images": stats["images"] + jnp.sum(counted, dtype=jnp.int32),
    }


def finalize(task, stats):
    images = int(np.asarray(stats["images"]))
    if images == 0:
        return {"miou": math.nan, "maxf": math.nan}
    iou = np.asarray(stats["iou_sum"], np.float64) / images
    precision = np.asarray(stats["precision_sum"], np.float64) / images
    recall = np.asarray(stats["recall_sum"], np.float64) / images
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"miou": float(iou.max()), "maxf": float(f.max())}


def paper_value(task, stats):
    return finalize(task, stats)["miou"]


def example_target(task, rng, batch, height, width):
    labels = (rng.uniform(size=(batch, height, width)) < 0.3).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < 0.05] = task.invalid
    return labels


KIND = TaskKind(
    name="saliency",
    losses={"balanced_bce": balanced_bce},
    headline="miou",
    lower_is_better=False,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=paper_value,
    example_target=example_target,
)
