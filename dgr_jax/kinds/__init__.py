"""The registry of task kinds (``base.TaskKind``); one module per kind."""

from __future__ import annotations

from dgr_jax.kinds import classification, edge, normal, regression, saliency, segmentation
from dgr_jax.kinds.base import TaskKind

KINDS: dict[str, TaskKind] = {
    module.KIND.name: module.KIND
    for module in (segmentation, regression, normal, classification, saliency, edge)
}


def get_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise ValueError(f"unknown task kind {name!r}; valid: {', '.join(KINDS)}")
    return KINDS[name]


__all__ = ["KINDS", "TaskKind", "get_kind"]
