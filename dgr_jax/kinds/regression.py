"""Dense regression (depth, disparity): a value per pixel ``(..., 1)``; pixels whose
target equals ``task.invalid`` (depth 0, disparity -1) are ignored.

Loss: L1 over valid pixels. Metrics: ``abs_err`` = Σ|pred − gt| / n, ``rel_err`` =
Σ(|pred − gt| / gt) / n over valid pixels (valid targets must be non-zero for it).
"""

from __future__ import annotations

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


def l1(task):
    def loss(prediction, target):
        return masked_mean(jnp.abs(prediction - target), target != task.invalid)

    return loss


def init_stats(task):
    return {
        "abs_sum": jnp.zeros((), sum_dtype()),
        "rel_sum": jnp.zeros((), sum_dtype()),
        "count": jnp.zeros((), jnp.int32),
        **batch_mean_stats(),
    }


def update_stats(task, stats, prediction, target):
    check_shapes(task, prediction, target, target.shape)
    valid = target != task.invalid
    error = jnp.abs(prediction - target)
    relative = jnp.where(valid, error / jnp.where(valid, target, 1), 0)  # no 0/0 at invalid pixels
    dtype = stats["abs_sum"].dtype
    return {
        "abs_sum": stats["abs_sum"] + jnp.sum(jnp.where(valid, error, 0), dtype=dtype),
        "rel_sum": stats["rel_sum"] + jnp.sum(relative, dtype=dtype),
        "count": stats["count"] + count(valid),
        **add_batch_mean(stats, error, valid, target.shape[0]),
    }


def finalize(task, stats):
    return {
        "abs_err": ratio(np.asarray(stats["abs_sum"]), np.asarray(stats["count"])),
        "rel_err": ratio(np.asarray(stats["rel_sum"]), np.asarray(stats["count"])),
    }


def example_target(task, rng, batch, height, width):
    value = rng.uniform(0.5, 5.0, (batch, height, width, 1)).astype(np.float32)
    value[rng.uniform(size=value.shape) < 0.1] = task.invalid
    return value


KIND = TaskKind(
    name="regression",
    losses={"l1": l1},
    headline="abs_err",
    lower_is_better=True,
    init_stats=init_stats,
    update_stats=update_stats,
    finalize=finalize,
    paper_value=batch_mean_value,
    example_target=example_target,
)
