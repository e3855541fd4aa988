"""Multi-task methods behind one optax-style interface (``base.MTLMethod``).

One module per family (``weighting``: loss weighting; ``gradients``: methods that
combine per-task gradients, with their on-device ``solvers``; ``balancing``: weights
from gradient norms; ``lookahead``: Auto-lambda's meta-learned weights); each exports
its factories in a ``METHODS`` dict, merged here into the registry that ``--weighting
NAME`` reads::

    method = get_method("uncertainty", initial_log_var=-0.7)
    params, state = method.init(num_tasks)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from dgr_jax.methods import balancing, gradients, lookahead, weighting
from dgr_jax.methods.base import (
    LookAhead,
    MTLMethod,
    NoState,
    per_task_gradients,
    stacked_vjps,
    weighted_sum,
)
from dgr_jax.methods.weighting import DWAState, UncertaintyParams, dwa, equal, uncertainty

METHODS: dict[str, Callable[..., MTLMethod]] = {
    **weighting.METHODS,
    **lookahead.METHODS,
    **gradients.METHODS,
    **balancing.METHODS,
}


def method_arguments(name: str) -> dict[str, Any]:
    """The hyper-parameters of ``METHODS[name]`` and their defaults (each paper's values)."""
    if name not in METHODS:
        raise ValueError(f"unknown MTL method {name!r}; valid: {', '.join(METHODS)}")
    return {p.name: p.default for p in inspect.signature(METHODS[name]).parameters.values()}


def get_method(name: str, **kwargs) -> MTLMethod:
    """``METHODS[name](**kwargs)``; an unknown name or argument raises a one-line ValueError."""
    known = method_arguments(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise ValueError(
            f"MTL method {name!r} has no argument {', '.join(unknown)}; its arguments: {listing}"
        )
    return METHODS[name](**kwargs)


__all__ = [
    "DWAState",
    "LookAhead",
    "METHODS",
    "MTLMethod",
    "NoState",
    "UncertaintyParams",
    "dwa",
    "equal",
    "get_method",
    "method_arguments",
    "per_task_gradients",
    "stacked_vjps",
    "uncertainty",
    "weighted_sum",
]
