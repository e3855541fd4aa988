"""One record per task: output channels, kind (which loss), invalid/ignore value.

Losses are those of the code the paper's numbers come from (auto-lambda's
``compute_loss``, unchanged in the DGR repository): pixel-wise cross-entropy over
non-ignored pixels for segmentation, L1 over valid pixels for depth/disparity, the L1
distance between unit normals (summed over the three channels) over valid pixels for
surface normals, where a pixel is valid when its target's channels do not sum to 0,
and cross-entropy for classification. Every mean is over valid elements only, so
ignored pixels never dilute a loss.

A kind may offer other losses, chosen with ``Task.loss_name``: normals also have
``"cosine"``, ``1 - cos(prediction, target)`` over pixels whose target is not all zero
(scale-free and bounded; not what the paper trained).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

KINDS = ("segmentation", "regression", "normal", "classification")

# Per kind, the losses it offers; the first is the default (the original code's).
LOSS_NAMES = {
    "segmentation": ("cross_entropy",),
    "regression": ("l1",),
    "normal": ("l1", "cosine"),
    "classification": ("cross_entropy",),
}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    channels: int
    kind: str
    invalid: float | int | None = None  # seg: ignore label; regression/normal: invalid value
    loss_name: str | None = None  # one of LOSS_NAMES[kind]; None: the kind's default

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss_name is not None and self.loss_name not in LOSS_NAMES[self.kind]:
            raise ValueError(f"Task {self.name!r}: loss_name must be one of {LOSS_NAMES[self.kind]} for a "
                             f"{self.kind} task, got {self.loss_name!r}")

    @property
    def loss_kind(self) -> str:
        return self.loss_name or LOSS_NAMES[self.kind][0]

    @property
    def loss(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return _LOSSES[self.kind](self)


def _masked_mean(values, mask):
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _segmentation_loss(task):
    def loss(logits, labels):
        valid = labels != task.invalid
        safe_labels = jnp.where(valid, labels, 0)
        per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
        return _masked_mean(per_pixel, valid)

    return loss


def _regression_loss(task):
    def loss(prediction, target):
        valid = target != task.invalid
        return _masked_mean(jnp.abs(prediction - target), valid)

    return loss


def _normal_loss(task):
    if task.loss_kind == "cosine":
        def loss(prediction, target):
            valid = jnp.any(target != 0, axis=-1)
            cosine = jnp.sum(prediction * target, axis=-1)
            return 1.0 - _masked_mean(cosine, valid)

        return loss

    def loss(prediction, target):  # "l1": sum over channels, mean over valid pixels
        valid = jnp.sum(target, axis=-1) != 0
        return _masked_mean(jnp.sum(jnp.abs(prediction - target), axis=-1), valid)

    return loss


def _classification_loss(task):
    def loss(logits, labels):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss


_LOSSES = {
    "segmentation": _segmentation_loss,
    "regression": _regression_loss,
    "normal": _normal_loss,
    "classification": _classification_loss,
}

NYUV2 = (
    Task("seg", 13, "segmentation", -1),
    Task("depth", 1, "regression", 0.0),
    Task("normal", 3, "normal", 0.0),
)
CITYSCAPES = (
    Task("seg", 19, "segmentation", -1),
    Task("part_seg", 10, "segmentation", -1),
    Task("disp", 1, "regression", -1.0),
)
UTKFACE = (
    Task("age", 7, "classification"),
    Task("gender", 2, "classification"),
    Task("ethnicity", 5, "classification"),
)
MULTIDIGITS = (
    Task("left", 10, "classification"),
    Task("right", 10, "classification"),
)
DATASETS = {"nyuv2": NYUV2, "cityscapes": CITYSCAPES, "utkface": UTKFACE, "multidigits": MULTIDIGITS}


def task_losses(tasks) -> dict[str, Callable]:
    return {task.name: task.loss for task in tasks}
