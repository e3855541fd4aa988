"""Evaluation metrics over a whole evaluation set, the paper's Δm and its printed tables.

Every metric comes from sufficient statistics summed over the whole set on device
(confusion matrices, error sums, valid counts, an angle histogram) and finalised once
by ``compute_metrics``; no metric is ever an average of per-batch metrics, so the
batch size and a short last batch change nothing::

    state = init_metric_state(tasks)
    for batch in evaluation_set:
        state = jitted_update(state, model_outputs(batch), batch)   # update_metric_state
    metrics = compute_metrics(tasks, jax.device_get(state))          # {"seg/miou": ..., ...}

States are pytrees of arrays, so ``merge_metric_states`` (a sum) combines chunks or hosts.

Conventions, per task kind (keys are ``"<task name>/<metric>"``):

``segmentation``
    ``confusion[target, prediction]`` (int32) over pixels whose label is not
    ``task.invalid``; prediction is the argmax of the logits. ``miou`` is the mean of
    ``TP / (TP + FP + FN)`` over the classes whose union ``TP + FP + FN`` is non-zero
    over the whole set (present in the targets or predicted somewhere); a class never
    labelled nor predicted is left out rather than counted as 0 or 1. On a full
    evaluation set, where every class occurs, this is the plain mean over classes that
    the MTL benchmark code reports. ``pix_acc`` = correct / valid pixels. A label that
    is neither the ignore value nor in ``[0, channels)`` is counted apart and makes
    ``compute_metrics`` raise, instead of silently vanishing from the statistics.
``regression`` (depth, disparity)
    Over pixels whose target is not ``task.invalid``: ``abs_err`` = Σ|pred − gt| / n,
    ``rel_err`` = Σ(|pred − gt| / gt) / n (valid targets must be non-zero for it).
``normal``
    Over pixels whose target is not all zero: the angle ``arccos(clip(<pred, gt>, −1, 1))``
    in degrees between the unit prediction and target (the benchmark formula; a zero
    prediction scores 90°). ``mean_angle`` = Σangle / n. ``median_angle`` comes from a
    histogram of ``NORMAL_HISTOGRAM_BINS`` bins over [0°, 180°] (0.001° wide): the
    order statistics are located exactly and reported at their bin's centre, so the
    median is within half a bin (0.0005°) of ``np.median`` of the same angles.
    ``within_11.25`` / ``within_22.5`` / ``within_30``: fractions of pixels with an
    angle strictly below the threshold. In float32, arccos of a rounded cosine is
    accurate to ~1e-5° at typical angles but only to ~0.02° for angles under ~1°.
``classification``
    ``acc`` = correct / n, prediction the argmax of the logits.

Counts are int32 (exact to 2**31 − 1 elements per set); error sums are accumulated in
the default float dtype (float32, or float64 with ``jax_enable_x64``). A metric with no
valid element in the whole set is NaN.

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
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.tasks import DATASETS, Task

MetricState = dict[str, dict[str, jax.Array]]

NORMAL_HISTOGRAM_BINS = 180_000
NORMAL_BIN_WIDTH = 180.0 / NORMAL_HISTOGRAM_BINS  # degrees
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)  # degrees; keys "within_11.25", "within_22.5", "within_30"


class Headline(NamedTuple):
    metric: str
    lower_is_better: bool


HEADLINE = {
    "segmentation": Headline("miou", False),
    "regression": Headline("abs_err", True),
    "normal": Headline("mean_angle", True),
    "classification": Headline("acc", False),
}
"""The paper's one metric per task, by task kind, and whether lower is better (the
``l_t = 1`` of Δm)."""


def headline_key(task: Task) -> str:
    """The key of ``task``'s headline metric in ``compute_metrics``' result, e.g. ``"seg/miou"``."""
    return f"{task.name}/{HEADLINE[task.kind].metric}"


# ---------------------------------------------------------------------------
# Sufficient statistics


def _sum_dtype():
    return jnp.result_type(float)  # float32, or float64 under jax_enable_x64


def _init_task_state(task: Task) -> dict[str, jax.Array]:
    count = jnp.zeros((), jnp.int32)
    if task.kind == "segmentation":
        return {"confusion": jnp.zeros((task.channels, task.channels), jnp.int32), "out_of_range": count}
    # The paper's convention: sum over batches of (examples in the batch) x (batch mean).
    batch_means = {"batch_mean_sum": jnp.zeros((), _sum_dtype()), "batch_examples": count}
    if task.kind == "regression":
        return {"abs_sum": jnp.zeros((), _sum_dtype()), "rel_sum": jnp.zeros((), _sum_dtype()), "count": count,
                **batch_means}
    if task.kind == "normal":
        return {"angle_sum": jnp.zeros((), _sum_dtype()), "count": count,
                "histogram": jnp.zeros((NORMAL_HISTOGRAM_BINS,), jnp.int32),
                "within": jnp.zeros((len(NORMAL_THRESHOLDS),), jnp.int32), **batch_means}
    return {"correct": count, "count": count, **batch_means}  # classification


def init_metric_state(tasks: Sequence[Task]) -> MetricState:
    """All-zero statistics, one dict per task name."""
    return {task.name: _init_task_state(task) for task in tasks}


def _check_shapes(task: Task, prediction, target, expected_prediction: tuple[int, ...]) -> None:
    # Shapes are static, so this runs at trace time and costs nothing under jit.
    if prediction.shape != expected_prediction:
        raise ValueError(f"metrics: task {task.name!r} ({task.kind}): prediction shape {prediction.shape} "
                         f"does not fit target shape {target.shape} (expected {expected_prediction})")


def _count(mask) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.int32)


def _add_batch_mean(state, values, mask, num_examples: int):
    """The paper's running mean: add ``num_examples * mean(values[mask])`` (NaN when the
    batch has no valid element, as the original's ``torch.mean`` of an empty selection)."""
    dtype = state["batch_mean_sum"].dtype
    mean = jnp.sum(jnp.where(mask, values, 0), dtype=dtype) / jnp.sum(mask, dtype=dtype)
    return {"batch_mean_sum": state["batch_mean_sum"] + num_examples * mean,
            "batch_examples": state["batch_examples"] + jnp.int32(num_examples)}


def _update_labels(task: Task, logits, labels, state):
    _check_shapes(task, logits, labels, labels.shape + (task.channels,))
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if task.kind == "classification":
        correct = predicted == labels
        return {"correct": state["correct"] + _count(correct),
                "count": state["count"] + jnp.int32(labels.size),
                **_add_batch_mean(state, correct, jnp.ones_like(correct), labels.shape[0])}
    classes = task.channels
    valid = labels != task.invalid
    in_range = (labels >= 0) & (labels < classes)
    counted = valid & in_range
    cell = jnp.where(counted, labels, 0).astype(jnp.int32) * classes + predicted
    cell = jnp.where(counted, cell, classes * classes)  # out of bounds: dropped below
    confusion = jnp.zeros((classes * classes,), jnp.int32).at[cell.reshape(-1)].add(1, mode="drop")
    return {"confusion": state["confusion"] + confusion.reshape(classes, classes),
            "out_of_range": state["out_of_range"] + _count(valid & ~in_range)}


def _update_regression(task: Task, prediction, target, state):
    _check_shapes(task, prediction, target, target.shape)
    valid = target != task.invalid
    error = jnp.abs(prediction - target)
    relative = jnp.where(valid, error / jnp.where(valid, target, 1), 0)  # no 0/0 at invalid pixels
    dtype = state["abs_sum"].dtype
    return {"abs_sum": state["abs_sum"] + jnp.sum(jnp.where(valid, error, 0), dtype=dtype),
            "rel_sum": state["rel_sum"] + jnp.sum(relative, dtype=dtype),
            "count": state["count"] + _count(valid),
            **_add_batch_mean(state, error, valid, target.shape[0])}


def _update_normal(task: Task, prediction, target, state):
    _check_shapes(task, prediction, target, target.shape)
    valid = jnp.any(target != 0, axis=-1).reshape(-1)
    cosine = jnp.clip(jnp.sum(prediction * target, axis=-1), -1, 1)
    angle = jnp.degrees(jnp.arccos(cosine)).reshape(-1)
    dtype = state["angle_sum"].dtype
    bins = jnp.clip(jnp.floor(angle / NORMAL_BIN_WIDTH), 0, NORMAL_HISTOGRAM_BINS - 1).astype(jnp.int32)
    bins = jnp.where(valid, bins, NORMAL_HISTOGRAM_BINS)  # out of bounds: dropped
    histogram = jnp.zeros((NORMAL_HISTOGRAM_BINS,), jnp.int32).at[bins].add(1, mode="drop")
    below = angle[:, None] < jnp.asarray(NORMAL_THRESHOLDS, angle.dtype)[None, :]
    paper_valid = (jnp.sum(target, axis=-1) != 0).reshape(-1)  # the original's validity test
    return {"angle_sum": state["angle_sum"] + jnp.sum(jnp.where(valid, angle, 0), dtype=dtype),
            "count": state["count"] + _count(valid),
            "histogram": state["histogram"] + histogram,
            "within": state["within"] + jnp.sum(below & valid[:, None], axis=0, dtype=jnp.int32),
            **_add_batch_mean(state, angle, paper_valid, target.shape[0])}


_UPDATES = {"segmentation": _update_labels, "classification": _update_labels,
            "regression": _update_regression, "normal": _update_normal}


def update_metric_state(tasks: Sequence[Task], state: MetricState, outputs: Mapping[str, jax.Array],
                        batch: Mapping[str, jax.Array]) -> MetricState:
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
        new_state[task.name] = _UPDATES[task.kind](task, jnp.asarray(outputs[task.name]),
                                                   jnp.asarray(batch[task.name]), state[task.name])
    return new_state


def merge_metric_states(a: MetricState, b: MetricState) -> MetricState:
    """The statistics of the union of two disjoint sets (chunks, hosts): their sum."""
    return jax.tree.map(lambda x, y: x + y, a, b)


# ---------------------------------------------------------------------------
# Finalising


def _ratio(numerator, denominator) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def _histogram_median(histogram: np.ndarray) -> float:
    cumulative = np.cumsum(histogram, dtype=np.int64)
    n = int(cumulative[-1])
    if n == 0:
        return math.nan
    # np.median: the mean of the order statistics (0-based) (n - 1) // 2 and n // 2.
    ranks = np.array([(n - 1) // 2, n // 2])
    bins = np.searchsorted(cumulative, ranks + 1)  # first bin holding more than `rank` angles
    return float(np.mean((bins + 0.5) * NORMAL_BIN_WIDTH))


def _task_metrics(task: Task, state: Mapping[str, Any]) -> dict[str, float]:
    s = {k: np.asarray(v) for k, v in state.items()}
    if task.kind == "segmentation":
        if s["out_of_range"] > 0:
            raise ValueError(f"compute_metrics: task {task.name!r} had {int(s['out_of_range'])} labels outside "
                             f"[0, {task.channels}) that are not the ignore label {task.invalid}")
        confusion = s["confusion"].astype(np.int64)
        true_positive = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        present = union > 0
        miou = float(np.mean(true_positive[present] / union[present])) if present.any() else math.nan
        return {"miou": miou, "pix_acc": _ratio(true_positive.sum(), confusion.sum())}
    if task.kind == "regression":
        return {"abs_err": _ratio(s["abs_sum"], s["count"]), "rel_err": _ratio(s["rel_sum"], s["count"])}
    if task.kind == "normal":
        count = int(s["count"])
        metrics = {"mean_angle": _ratio(s["angle_sum"], count), "median_angle": _histogram_median(s["histogram"])}
        for threshold, within in zip(NORMAL_THRESHOLDS, s["within"]):
            metrics[f"within_{threshold:g}"] = _ratio(within, count)
        return metrics
    return {"acc": _ratio(s["correct"], s["count"])}


def compute_metrics(tasks: Sequence[Task], state: MetricState) -> dict[str, float]:
    """Host-side floats ``{"<task>/<metric>": value}`` from whole-set statistics
    (pass ``jax.device_get(state)`` or the device arrays)."""
    return {f"{task.name}/{name}": value
            for task in tasks for name, value in _task_metrics(task, state[task.name]).items()}


def compute_paper_metrics(tasks: Sequence[Task], state: MetricState) -> dict[str, float]:
    """The headline metric of each task in the paper's convention (module docstring):
    ``{headline_key(task): value}``, from the same state as ``compute_metrics``."""
    result = {}
    for task in tasks:
        s = {k: np.asarray(v) for k, v in state[task.name].items()}
        if task.kind == "segmentation":
            confusion = s["confusion"].astype(np.float64)
            true_positive = np.diag(confusion)
            with np.errstate(invalid="ignore", divide="ignore"):
                value = float(np.mean(true_positive / (confusion.sum(0) + confusion.sum(1) - true_positive)))
        else:
            value = _ratio(s["batch_mean_sum"], s["batch_examples"])
        result[headline_key(task)] = value
    return result


# ---------------------------------------------------------------------------
# Δm and single-task references


def load_reference(reference: Mapping[str, float], tasks: Sequence[Task]) -> dict[str, float]:
    """Check single-task reference metrics for ``tasks`` and return their headline values.

    ``reference`` is a dict such as ``PAPER_SINGLE_TASK["nyuv2"]`` or the parsed JSON of
    your own single-task runs (dgr_jax reads no files: ``json.load`` it yourself). It
    must hold ``headline_key(task)`` for every task, as a finite non-zero number; other
    keys are allowed and dropped. Raises a one-line ``ValueError`` naming the problem key."""
    if isinstance(reference, (str, bytes, os.PathLike)):
        raise TypeError(f"load_reference: got the path {reference!r}; dgr_jax reads no files, "
                        "so load the JSON yourself and pass the dict")
    if not isinstance(reference, Mapping):
        raise TypeError(f"load_reference: expected a dict of metrics, got {type(reference).__name__}")
    checked = {}
    for task in tasks:
        key = headline_key(task)
        if key not in reference:
            raise ValueError(f"reference: missing {key!r} (task {task.name!r}); "
                             f"it has {', '.join(map(repr, reference)) or 'no keys'}")
        try:
            value = float(reference[key])
        except (TypeError, ValueError):
            raise ValueError(f"reference: {key!r} must be a number, got {reference[key]!r}") from None
        if not math.isfinite(value) or value == 0:
            raise ValueError(f"reference: {key!r} must be finite and non-zero (Δm divides by it), got {value}")
        checked[key] = value
    return checked


def delta_m(metrics: Mapping[str, float], reference: Mapping[str, float], tasks: Sequence[Task]) -> float:
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
        sign = -1.0 if HEADLINE[task.kind].lower_is_better else 1.0
        total += sign * (float(metrics[key]) - single[key]) / single[key]
    return total / len(tasks)


PAPER_SINGLE_TASK = {
    "nyuv2": {"seg/miou": 0.4337, "depth/abs_err": 0.5224, "normal/mean_angle": 22.40},
    "cityscapes": {"seg/miou": 0.5620, "part_seg/miou": 0.5274, "disp/abs_err": 0.84},
    "utkface": {"age/acc": 0.5233, "gender/acc": 0.8964, "ethnicity/acc": 0.7728},
}
"""The paper's single-task references (its "Single" rows), in our units and keys."""


# ---------------------------------------------------------------------------
# The paper's tables, transcribed as printed (shared/reference/paper_tables.md, ResNet-50,
# averages of three runs). Each row: the printed metrics in the table's column order,
# then the printed Δm in percent (None for Single). "+ Ours" is the row above plus DGR.

# Table 1: accuracy, as fractions.
_UTKFACE_COLUMNS = (("age/acc", 1.0), ("gender/acc", 1.0), ("ethnicity/acc", 1.0))
_UTKFACE = {
    "Single": (0.5233, 0.8964, 0.7728, None),
    "Vanilla": (0.5391, 0.9153, 0.7948, 2.66),
    "Vanilla + Ours": (0.5605, 0.9019, 0.7942, 3.50),
    "DWA": (0.5370, 0.9148, 0.7989, 2.68),
    "DWA + Ours": (0.5336, 0.9135, 0.8056, 2.71),
    "Uncertainty": (0.5385, 0.9137, 0.7961, 2.62),
    "Uncertainty + Ours": (0.5455, 0.9118, 0.7988, 3.11),
    "Auto-λ": (0.5405, 0.9171, 0.7965, 2.89),
    "Auto-λ + Ours": (0.5503, 0.9163, 0.8014, 3.69),
    "PCGrad": (0.5417, 0.9134, 0.7960, 2.80),
    "PCGrad + Ours": (0.5431, 0.8999, 0.7986, 2.50),
    "CAGrad": (0.5390, 0.9239, 0.7994, 3.17),
    "CAGrad + Ours": (0.5510, 0.9169, 0.8094, 4.11),
    "IMTL": (0.5250, 0.9173, 0.8039, 2.23),
    "IMTL + Ours": (0.5430, 0.9020, 0.8051, 2.86),
    "Nash-MTL": (0.5485, 0.9172, 0.8021, 3.64),
    "Nash-MTL + Ours": (0.5545, 0.9063, 0.8055, 3.77),
}

# Table 2: normal mean angle (deg), seg mIoU (%), depth abs err (x100). Split | MTAN.
_NYUV2_COLUMNS = (("normal/mean_angle", 1.0), ("seg/miou", 0.01), ("depth/abs_err", 0.01))
_NYUV2 = {
    "Single": ((22.40, 43.37, 52.24, None), (22.40, 43.37, 52.24, None)),
    "Vanilla": ((24.19, 46.02, 41.36, 6.32), (24.05, 46.05, 41.03, 6.55)),
    "Vanilla + Ours": ((23.98, 47.11, 40.11, 8.26), (24.04, 46.24, 39.98, 7.51)),
    "DWA": ((24.20, 45.84, 41.58, 6.02), (24.06, 46.47, 41.48, 6.71)),
    "DWA + Ours": ((24.18, 46.43, 41.08, 6.82), (24.10, 46.81, 41.37, 7.24)),
    "Uncertainty": ((24.24, 46.46, 41.04, 6.78), (23.97, 46.96, 41.02, 7.57)),
    "Uncertainty + Ours": ((24.34, 46.52, 40.80, 6.83), (23.89, 46.23, 40.00, 7.28)),
    "Auto-λ": ((23.60, 48.20, 39.83, 9.85), (23.43, 48.10, 39.21, 10.02)),
    "Auto-λ + Ours": ((23.60, 48.04, 39.45, 9.96), (23.32, 48.19, 39.03, 10.50)),
    "PCGrad": ((24.55, 45.41, 42.32, 4.70), (24.07, 46.71, 39.79, 5.41)),
    "PCGrad + Ours": ((24.03, 46.71, 41.20, 7.19), (23.95, 46.86, 39.73, 7.42)),
    "CAGrad": ((23.39, 46.79, 40.55, 8.61), (23.23, 47.48, 39.92, 9.38)),
    "CAGrad + Ours": ((23.28, 47.48, 39.81, 9.78), (22.98, 48.49, 38.94, 11.56)),
    "IMTL": ((22.45, 50.11, 38.69, 13.75), (22.53, 49.84, 38.43, 13.43)),
    "IMTL + Ours": ((22.37, 49.62, 37.70, 14.13), (22.39, 50.04, 38.18, 14.42)),
    "Nash-MTL": ((23.60, 48.20, 39.83, 9.85), (23.43, 48.10, 39.84, 10.02)),
    "Nash-MTL + Ours": ((22.54, 48.25, 39.53, 11.65), (22.66, 48.38, 39.59, 11.75)),
}

# Table 3: seg mIoU (%), part-seg mIoU (%), disparity abs err. Split | MTAN.
_CITYSCAPES_COLUMNS = (("seg/miou", 0.01), ("part_seg/miou", 0.01), ("disp/abs_err", 1.0))
_CITYSCAPES = {
    "Single": ((56.20, 52.74, 0.84, None), (56.20, 52.74, 0.84, None)),
    "Vanilla": ((56.29, 52.31, 0.75, 3.35), (56.64, 52.52, 0.74, 4.09)),
    "Vanilla + Ours": ((56.27, 52.45, 0.74, 3.83), (57.13, 51.88, 0.73, 4.37)),
    "DWA": ((55.63, 52.22, 0.72, 4.10), (55.88, 52.51, 0.72, 4.43)),
    "DWA + Ours": ((55.84, 52.39, 0.72, 4.33), (55.65, 52.54, 0.72, 4.31)),
    "Uncertainty": ((56.77, 54.59, 0.77, 4.29), (56.66, 55.03, 0.76, 4.89)),
    "Uncertainty + Ours": ((56.76, 55.46, 0.78, 4.43), (56.59, 55.10, 0.75, 5.29)),
    "Auto-λ": ((55.95, 52.94, 0.70, 5.53), (55.97, 52.67, 0.69, 5.77)),
    "Auto-λ + Ours": ((57.22, 53.55, 0.71, 6.28), (56.76, 53.29, 0.69, 6.63)),
    "PCGrad": ((55.40, 52.53, 0.72, 4.15), (55.53, 52.83, 0.72, 4.42)),
    "PCGrad + Ours": ((56.04, 52.53, 0.72, 4.53), (56.61, 52.75, 0.72, 5.01)),
    "CAGrad": ((56.55, 55.05, 0.71, 6.83), (56.36, 55.32, 0.72, 6.49)),
    "CAGrad + Ours": ((57.05, 55.16, 0.71, 7.19), (56.66, 56.07, 0.72, 7.14)),
    "IMTL": ((58.33, 55.43, 0.76, 6.14), (58.67, 55.77, 0.76, 6.55)),
    "IMTL + Ours": ((58.46, 55.33, 0.75, 6.55), (58.12, 55.73, 0.75, 6.60)),
    "Nash-MTL": ((57.65, 55.59, 0.75, 6.23), (57.64, 55.09, 0.74, 6.31)),
    "Nash-MTL + Ours": ((57.78, 55.04, 0.74, 6.36), (57.77, 55.60, 0.74, 6.71)),
}

_SCENE_NETWORKS = ("split", "mtan")


def _row(columns, printed) -> dict[str, float]:
    *values, delta = printed
    row = {key: round(value * scale, 10) for (key, scale), value in zip(columns, values)}
    row["delta_m"] = 0.0 if delta is None else round(delta / 100, 10)
    return row


def paper_rows(dataset: str, network: str | None = None) -> dict[str, dict[str, float]]:
    """The paper's rows for ``dataset``: ``{method: {metric key: value, "delta_m": Δm}}``
    in our units (mIoU and accuracy as fractions, NYUv2 depth abs err in metres, angles in
    degrees, Δm as a fraction; "Single" has Δm 0). Methods: "Single", then each of
    Vanilla, DWA, Uncertainty, Auto-λ, PCGrad, CAGrad, IMTL, Nash-MTL with and without
    " + Ours" (DGR). ``network``: "split" or "mtan" for nyuv2 / cityscapes, None for
    utkface. A dataset of ``dgr_jax.tasks.DATASETS`` that the paper has no table for gives {}."""
    if dataset == "utkface":
        if network is not None:
            raise ValueError(f"paper_rows('utkface'): Table 1 has one network; pass network=None, not {network!r}")
        return {method: _row(_UTKFACE_COLUMNS, printed) for method, printed in _UTKFACE.items()}
    if dataset in ("nyuv2", "cityscapes"):
        if network not in _SCENE_NETWORKS:
            raise ValueError(f"paper_rows({dataset!r}): network must be one of {_SCENE_NETWORKS}, got {network!r}")
        table, columns = (_NYUV2, _NYUV2_COLUMNS) if dataset == "nyuv2" else (_CITYSCAPES, _CITYSCAPES_COLUMNS)
        column = _SCENE_NETWORKS.index(network)
        return {method: _row(columns, printed[column]) for method, printed in table.items()}
    if dataset in DATASETS:
        return {}
    raise ValueError(f"paper_rows: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


_PAPER_NAMES = {
    "equal": "Vanilla", "vanilla": "Vanilla", "dwa": "DWA", "uncertainty": "Uncertainty",
    "autolambda": "Auto-λ", "autoλ": "Auto-λ", "pcgrad": "PCGrad", "cagrad": "CAGrad",
    "imtl": "IMTL", "nashmtl": "Nash-MTL",
}


def paper_method_name(weighting: str, dgr: bool) -> str:
    """The paper's row name for a weighting method (``"equal"`` -> ``"Vanilla"``,
    ``"auto_lambda"`` -> ``"Auto-λ"``, ...) with ``" + Ours"`` when DGR is on. A weighting
    the paper does not report keeps its own name (so it matches no ``paper_rows`` row)."""
    base = _PAPER_NAMES.get(weighting.lower().replace("_", "").replace("-", ""), weighting)
    return f"{base} + Ours" if dgr else base
