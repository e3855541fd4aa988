"""Pixel-wise classification (semantic / part segmentation): logits ``(..., C)``, integer
labels ``(...)`` with ``task.invalid`` (-1) ignored.

Loss: cross-entropy averaged over non-ignored pixels (``F.cross_entropy(ignore_index=-1)``).
Metrics: ``confusion[target, prediction]`` (int32) over non-ignored pixels; ``miou`` the
mean of ``TP / (TP + FP + FN)`` over the classes whose union is non-zero over the whole
set (a class neither labelled nor predicted anywhere is left out rather than counted as
0 or 1; on a full evaluation set, where every class occurs, this is the plain mean),
``pix_acc`` correct / valid pixels. A label that is neither ignored nor in ``[0, C)`` is
counted apart and makes ``finalize`` raise. The paper's convention averages every class,
so an absent one makes its mIoU NaN.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from dgr_jax.kinds.base import TaskKind, check_shapes, count, masked_mean


def cross_entropy(task):
    def loss(logits, labels):
        valid = labels != task.invalid
        per_pixel = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.where(valid, labels, 0)
        )
        return masked_mean(per_pixel, valid)

    return loss


def init_stats(task):
    return {
        "confusion": jnp.zeros((task.channels, task.channels), jnp.int32),
        "out_of_range": jnp.zeros((), jnp.int32),
    }


def update_stats(task, stats, logits, labels):
    check_shapes(task, logits, labels, labels.shape + (task.channels,))
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    classes = task.channels
    valid = labels != task.invalid
    in_range = (labels >= 0) & (labels < classes)
    counted = valid & in_range
    cell = jnp.where(counted, labels, 0).astype(jnp.int32) * classes + predicted
    cell = jnp.where(counted, cell, classes * classes)  # out of bounds: dropped below
    confusion = jnp.zeros((classes * classes,), jnp.int32).at[cell.reshape(-1)].add(1, mode="drop")
    return {
        "confusion": stats["confusion"] + confusion.reshape(classes, classes),
        "out_of_range": stats["out_of_range"] + count(valid & ~in_range),
    }


def _iou(stats):
    confusion = np.asarray(stats["confusion"]).astype(np.int64)
    true_positive = np.diag(confusion)
    return true_positive, confusion.sum(0) + confusion.sum(1) - true_positive, confusion


def finalize(task, stats):
    if np.asarray(stats["out_of_range"]) > 0:
        raise ValueError(
            f"compute_metrics: task {task.name!r} had {int(stats['out_of_range'])} labels outside "
            f"[0, {task.channels}) that are not the ignore label {task.invalid}"
        )
    true_positive, union, confusion = _iou(stats)
    present = union > 0
    miou = float(np.mean(true_positive[present] / union[present])) if present.any() else math.nan
    total = confusion.sum()
    return {"miou": miou, "pix_acc": float(true_positive.sum()) / total if total > 0 else math.nan}


def paper_value(task, stats):
    true_positive, union, _ = _iou(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.mean(true_positive / union))


def example_target(task, rng, batch, height, width):
    labels = rng.integers(0, task.channels, (batch, height, width))
    labels[rng.uniform(size=labels.shape) < 0.1] = task.invalid
    return labels.astype(np.int32)


KIND = TaskKind(
    name="segmentation",
    losses={"cross_entropy": cross_entropy},
    headline="miou",
    lower_is_better=False,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=paper_value,
    example_target=example_target,
)
