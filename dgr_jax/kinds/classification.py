"""Image-level classification (UTKFace, MultiDigits, ImageNet): logits ``(B, C)``, labels ``(B,)``.

Loss: cross-entropy. Metrics: ``acc`` = correct / n, prediction the argmax (the
headline); for more than ``TOP5_ABOVE`` = 10 classes (ImageNet's 1000) also ``top5``, the
fraction of examples whose label is among the 5 largest logits (ties broken towards the
lower class index, as argmax). On 10 classes or fewer (UTKFace's 7, 2 and 5, MultiDigits'
10) top-5 says little and is not reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgr_jax.kinds.base import (
    TaskKind,
    add_batch_mean,
    batch_mean_stats,
    batch_mean_value,
    check_shapes,
    count,
    ratio,
)


def cross_entropy(task):
    def loss(logits, labels):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss


TOP_K = 5
TOP5_ABOVE = 10  # classes; top-5 accuracy is reported for tasks with more


def has_top5(task) -> bool:
    return task.channels > TOP5_ABOVE


def init_stats(task):
    top5 = {"correct_top5": jnp.zeros((), jnp.int32)} if has_top5(task) else {}
    return {
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        **top5,
        **batch_mean_stats(),
    }


def in_top_k(logits, labels, k: int = TOP_K):
    """Whether each label is among the ``k`` largest logits: bool ``(B,)``."""
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[..., None], axis=-1)


def update_stats(task, stats, logits, labels):
    check_shapes(task, logits, labels, labels.shape + (task.channels,))
    correct = jnp.argmax(logits, axis=-1).astype(jnp.int32) == labels
    top5 = (
        {"correct_top5": stats["correct_top5"] + count(in_top_k(logits, labels))}
        if has_top5(task)
        else {}
    )
    return {
        "correct": stats["correct"] + count(correct),
        "count": stats["count"] + jnp.int32(labels.size),
        **top5,
        **add_batch_mean(stats, correct, jnp.ones_like(correct), labels.shape[0]),
    }


def finalize(task, stats):
    total = np.asarray(stats["count"])
    values = {"acc": ratio(np.asarray(stats["correct"]), total)}
    if has_top5(task):
        values["top5"] = ratio(np.asarray(stats["correct_top5"]), total)
    return values


def example_target(task, rng, batch, height, width):
    del height, width
    return rng.integers(0, task.channels, (batch,)).astype(np.int32)


KIND = TaskKind(
    name="classification",
    losses={"cross_entropy": cross_entropy},
    headline="acc",
    lower_is_better=False,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=batch_mean_value,
    example_target=example_target,
)
