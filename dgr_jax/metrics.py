"""Evaluation metrics over a whole evaluation set, and the paper's Δm.

Every metric comes from sufficient statistics summed over the whole set on device
(confusion matrices, error sums, valid counts, an angle histogram) and finalised once
by ``compute_metrics``; no metric is ever an average of per-batch metrics, so the
batch size and a short last batch change nothing::

    state = init_metric_state(tasks)
    for batch in evaluation_set:
        state = jitted_update(state, model_outputs(batch), batch)   # update_metric_state
    metrics = compute_metrics(tasks, jax.device_get(state))          # {"seg/miou": ..., ...}

States are pytrees of arrays, so ``merge_metric_states`` (a sum) combines chunks or hosts.
What each task kind measures, and how, is in its module of ``dgr_jax.kinds`` (keys are
``"<task name>/<metric>"``). Counts are int32 (exact to 2**31 − 1 elements per set);
error sums are accumulated in the default float dtype (float32, or float64 with
``jax_enable_x64``). A metric with no valid element in the whole set is NaN.

Δm (``delta_m``) is returned as a fraction: 0.0632 means the paper's "+6.32%".

**The paper's convention** (``compute_paper_metrics``), kept beside ours because the
paper's numbers come from it: auto-lambda's ``TaskMetric`` averages per-batch values,
each batch weighted by its number of examples (a short last batch of b in batches of B
counts b/B), i.e. ``Σ_b n_b m_b / Σ_b n_b`` for the batch values ``m_b``: the batch's
mean depth / disparity error over its valid pixels, its mean normal angle over pixels
whose target channels do not sum to 0 (the original's validity test), its accuracy.
Segmentation mIoU comes from the whole-set confusion matrix, as ours, but averages
over every class: a class neither labelled nor predicted anywhere gives 0/0 and makes
the mIoU NaN, as in the original. These figures depend on the evaluation batch size;
ours do not.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from dgr_jax.kinds.normal import BIN_WIDTH as NORMAL_BIN_WIDTH  # noqa: F401  (re-exported)
from dgr_jax.kinds.normal import HISTOGRAM_BINS as NORMAL_HISTOGRAM_BINS  # noqa: F401
from dgr_jax.kinds.normal import THRESHOLDS as NORMAL_THRESHOLDS  # noqa: F401
from dgr_jax.tasks import Task

MetricState = dict[str, dict[str, jax.Array]]


def headline_key(task: Task) -> str:
    """The key of ``task``'s headline metric in ``compute_metrics``' result, e.g. ``"seg/miou"``."""
    return task.headline_key


def init_metric_state(tasks: Sequence[Task]) -> MetricState:
    """All-zero statistics, one dict per task name."""
    return {task.name: task.record.init_stats(task) for task in tasks}


def update_metric_state(
    tasks: Sequence[Task],
    state: MetricState,
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
) -> MetricState:
    """Add one batch's statistics. ``outputs[name]``: logits ``(..., C)`` (segmentation,
    classification), values shaped like the target (regression), unit normals
    ``(..., 3)`` (normal); ``batch[name]``: the target (integer labels ``(...)`` without
    the class axis for segmentation and classification). Other keys are ignored. Pure
    and jit-able: no data-dependent Python control flow; shape errors raise at trace time."""
    new_state = dict(state)
    for task in tasks:
        for source, what in ((outputs, "outputs"), (batch, "batch")):
            if task.name not in source:
                raise ValueError(f"update_metric_state: {what} has no entry for task {task.name!r}")
        new_state[task.name] = task.record.update_stats(
            task, state[task.name], jnp.asarray(outputs[task.name]), jnp.asarray(batch[task.name])
        )
    return new_state


def merge_metric_states(a: MetricState, b: MetricState) -> MetricState:
    """The statistics of the union of two disjoint sets (chunks, hosts): their sum."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def compute_metrics(tasks: Sequence[Task], state: MetricState) -> dict[str, float]:
    """Host-side floats ``{"<task>/<metric>": value}`` from whole-set statistics
    (pass ``jax.device_get(state)`` or the device arrays)."""
    return {
        f"{task.name}/{name}": value
        for task in tasks
        for name, value in task.record.finalize(task, state[task.name]).items()
    }


def compute_paper_metrics(tasks: Sequence[Task], state: MetricState) -> dict[str, float]:
    """The headline metric of each task in the paper's convention (module docstring):
    ``{headline_key(task): value}``, from the same state as ``compute_metrics``."""
    return {task.headline_key: task.record.paper_value(task, state[task.name]) for task in tasks}


# ---------------------------------------------------------------------------
# Δm and single-task references


def load_reference(reference: Mapping[str, float], tasks: Sequence[Task]) -> dict[str, float]:
    """Check single-task reference metrics for ``tasks`` and return their headline values.

    ``reference`` is a dict such as ``paper_tables.PAPER_SINGLE_TASK["nyuv2"]`` or the parsed JSON of
    your own single-task runs (dgr_jax reads no files: ``json.load`` it yourself). It
    must hold ``headline_key(task)`` for every task, as a finite non-zero number; other
    keys are allowed and dropped. Raises a one-line ``ValueError`` naming the problem key."""
    if isinstance(reference, (str, bytes, os.PathLike)):
        raise TypeError(
            f"load_reference: got the path {reference!r}; dgr_jax reads no files, "
            "so load the JSON yourself and pass the dict"
        )
    if not isinstance(reference, Mapping):
        raise TypeError(
            f"load_reference: expected a dict of metrics, got {type(reference).__name__}"
        )
    checked = {}
    for task in tasks:
        key = headline_key(task)
        if key not in reference:
            raise ValueError(
                f"reference: missing {key!r} (task {task.name!r}); "
                f"it has {', '.join(map(repr, reference)) or 'no keys'}"
            )
        try:
            value = float(reference[key])
        except (TypeError, ValueError):
            raise ValueError(
                f"reference: {key!r} must be a number, got {reference[key]!r}"
            ) from None
        if not math.isfinite(value) or value == 0:
            raise ValueError(
                f"reference: {key!r} must be finite and non-zero (Δm divides by it), got {value}"
            )
        checked[key] = value
    return checked


def delta_m(
    metrics: Mapping[str, float], reference: Mapping[str, float], tasks: Sequence[Task]
) -> float:
    """Δm = (1/T) Σ_t (−1)^{l_t} (M_t − M_t^single) / M_t^single over the headline metric
    of each task in ``tasks`` (pass a subset for Δm over those), ``l_t = 1`` where lower
    is better. Returned as a FRACTION: 0.0632 is the paper's "+6.32%"."""
    if not tasks:
        raise ValueError("delta_m: no tasks")
    single = load_reference(reference, tasks)
    total = 0.0
    for task in tasks:
        key = headline_key(task)
        if key not in metrics:
            raise ValueError(f"delta_m: metrics has no {key!r} (task {task.name!r})")
        sign = -1.0 if task.record.lower_is_better else 1.0
        total += sign * (float(metrics[key]) - single[key]) / single[key]
    return total / len(tasks)
