"""One record per task: output channels, kind, invalid/ignore value, loss.

A task's kind (``dgr_jax.kinds``) says everything about it that is not its name or size:
the losses it offers, the heads' output activation, its metrics and headline. Losses are
those of the code the paper's numbers come from (auto-lambda's ``compute_loss``,
unchanged in the DGR repository): pixel-wise cross-entropy over non-ignored pixels for
segmentation, L1 over valid pixels for depth/disparity, the L1 distance between unit
normals over valid pixels for surface normals, cross-entropy for classification. Every
mean is over valid elements only, so ignored pixels never dilute a loss. A kind may offer
other losses, chosen with ``Task.loss_name`` (normals: ``"cosine"``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from dgr_jax.kinds import KINDS, TaskKind


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    channels: int
    kind: str  # a key of dgr_jax.kinds.KINDS
    invalid: float | int | None = None  # seg: ignore label; regression/normal: invalid value
    loss_name: str | None = None  # one of the kind's losses; None: its default (the original's)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"Task {self.name!r}: kind must be one of {tuple(KINDS)}, got {self.kind!r}"
            )
        losses = tuple(self.record.losses)
        if self.loss_name is not None and self.loss_name not in losses:
            raise ValueError(
                f"Task {self.name!r}: loss_name must be one of {losses} for a "
                f"{self.kind} task, got {self.loss_name!r}"
            )

    @property
    def record(self) -> TaskKind:
        return KINDS[self.kind]

    @property
    def loss(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
        losses = self.record.losses
        return losses[self.loss_name or next(iter(losses))](self)

    @property
    def headline_key(self) -> str:
        """The key of the paper's metric for this task, e.g. ``"seg/miou"``."""
        return f"{self.name}/{self.record.headline}"


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
# Pascal-Context's five tasks (the PASCAL-MT layout of ASTMT / MTI-Net), in the order of
# the paper's Table 4(c): 21-class semantic and 7-class human-part segmentation, surface
# normals, saliency and edges.
PASCAL_CONTEXT = (
    Task("seg", 21, "segmentation", -1),
    Task("human_parts", 7, "segmentation", -1),
    Task("normal", 3, "normal", 0.0),
    Task("saliency", 1, "saliency", -1),
    Task("edge", 1, "edge", -1),
)
MULTIDIGITS = (
    Task("left", 10, "classification"),
    Task("right", 10, "classification"),
)
# Single-task ImageNet classification (the paper's Table 4(a), last row).
IMAGENET = (Task("label", 1000, "classification"),)


def task_losses(tasks) -> dict[str, Callable]:
    return {task.name: task.loss for task in tasks}
