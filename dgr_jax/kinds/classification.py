"""Image-level classification (UTKFace, MultiDigits): logits ``(B, C)``, labels ``(B,)``.

Loss: cross-entropy. Metric: ``acc`` = correct / n, prediction the argmax.
"""

from __future__ import annotations

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


def init_stats(task):
    return {
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        **batch_mean_stats(),
    }


def update_stats(task, stats, logits, labels):
    check_shapes(task, logits, labels, labels.shape + (task.channels,))
    correct = jnp.argmax(logits, axis=-1).astype(jnp.int32) == labels
    return {
        "correct": stats["correct"] + count(correct),
        "count": stats["count"] + jnp.int32(labels.size),
        **add_batch_mean(stats, correct, jnp.ones_like(correct), labels.shape[0]),
    }


def finalize(task, stats):
    return {"acc": ratio(np.asarray(stats["correct"]), np.asarray(stats["count"]))}


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
