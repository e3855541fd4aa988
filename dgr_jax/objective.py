"""The multi-task objective of a ``MultiTaskNet`` with the DGR penalty.

``task_losses_and_penalty`` is what the train step differentiates: the encoder runs
once, its features feed the task heads and the K stacked dummy sets (vmapped, or
unrolled on CPU: ``DGRConfig.unroll_sets``), and one backward pass carries the
penalty's gradient into the encoder with the task gradients (docs/design.md, "Share the
encoder backward").

``paper_dgr_encoder_grads`` is the original algorithm, kept for comparison: per dummy
set the whole model runs forward again with the perturbed dummy set and two more
backward passes go through the encoder. ``repeat_running_stats_update`` reproduces the
side effect of those extra train-mode forwards on the BatchNorm running statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from dgr_jax.errors import ConfigError
from dgr_jax.models import MTANEncoder, MultiTaskNet, heads_apply_fn
from dgr_jax.models.batch_norm import MOMENTUM
from dgr_jax.penalty import PENALTY_ESTIMATORS, heads_penalty
from dgr_jax.tasks import Task, task_losses

PyTree = Any

DGR_ESTIMATORS = PENALTY_ESTIMATORS + ("paper",)


@dataclasses.dataclass(frozen=True)
class DGRConfig:
    """``weight`` is lambda (0 turns DGR off). ``estimator``: one of ``dgr_penalty``'s
    (``PENALTY_ESTIMATORS``), or ``"paper"`` for the original algorithm through the whole
    model (``paper_dgr_encoder_grads``). ``squared``: penalise ``||g||^2`` instead of
    ``||g||``. The original code's update is ``DGRConfig(estimator="paper", squared=True,
    num_dummy=1, fd_eps=1e-3)``; the paper's text (and our default) is the norm, K = 3."""

    weight: float = 0.0
    num_dummy: int = 3
    estimator: str = "exact"
    squared: bool = False
    fd_eps: float = 1e-3
    # None: unroll the K dummy sets on CPU, vmap them elsewhere (see dgr_penalty).
    unroll_sets: bool | None = None

    def unrolled(self) -> bool:
        return jax.default_backend() == "cpu" if self.unroll_sets is None else self.unroll_sets

    @property
    def on(self) -> bool:
        return self.weight > 0

    def __post_init__(self):
        if self.estimator not in DGR_ESTIMATORS:
            raise ConfigError(
                "DGRConfig", "estimator", f"must be one of {DGR_ESTIMATORS}, got {self.estimator!r}"
            )
        if not self.weight >= 0:
            raise ConfigError("DGRConfig", "weight", f"must be >= 0, got {self.weight}")
        if self.num_dummy < 1:
            raise ConfigError("DGRConfig", "num_dummy", f"must be >= 1, got {self.num_dummy}")
        if not self.fd_eps > 0:
            raise ConfigError("DGRConfig", "fd_eps", f"must be > 0, got {self.fd_eps}")


def _forward(net, params, batch_stats, images, rng):
    (features, outputs), updates = net.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    return features, outputs, updates["batch_stats"]


def _losses_and_penalty(net, tasks, dgr, dummy_sets, features, outputs, batch):
    """The task losses of ``outputs`` and the DGR penalty of the dummy sets on ``features``."""
    losses = task_losses(tasks)
    per_task = jnp.stack([losses[t.name](outputs[t.name], batch[t.name]) for t in tasks])
    penalty = jnp.zeros((), per_task.dtype)
    if dgr.on and dgr.estimator != "paper":
        penalty = heads_penalty(
            heads_apply_fn(net.heads, batch["image"].shape[1:3]),
            dummy_sets,
            features,
            {t.name: batch[t.name] for t in tasks},
            losses,
            estimator=dgr.estimator,
            squared=dgr.squared,
            fd_eps=dgr.fd_eps,
            unroll_sets=dgr.unrolled(),
        )
    return per_task, penalty


def task_losses_and_penalty(
    net: MultiTaskNet,
    tasks: Sequence[Task],
    dgr: DGRConfig,
    params: PyTree,
    batch_stats: PyTree,
    dummy_sets: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
):
    """``(task_losses (T,), penalty, new_batch_stats)`` with the encoder run once.

    ``params``: ``{"encoder", "heads"}``. The penalty is the mean DGR penalty of the K
    dummy sets on the same features (0 when ``dgr.weight == 0`` or ``estimator ==
    "paper"``, whose gradient ``paper_dgr_encoder_grads`` supplies instead).
    """
    images = batch["image"]
    features, outputs, new_batch_stats = _forward(net, params, batch_stats, images, rng)
    per_task, penalty = _losses_and_penalty(net, tasks, dgr, dummy_sets, features, outputs, batch)
    return per_task, penalty, new_batch_stats


def encode(net: MultiTaskNet, encoder_params: PyTree, batch_stats: PyTree, images, rng):
    """The encoder alone in training mode: ``(features, new encoder batch_stats)``."""
    features, updates = net.encoder.apply(
        {"params": encoder_params, "batch_stats": batch_stats.get("encoder", {})},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    return features, updates.get("batch_stats", {})


def task_losses_and_penalty_on_features(
    net: MultiTaskNet,
    tasks: Sequence[Task],
    dgr: DGRConfig,
    heads_params: PyTree,
    batch_stats: PyTree,
    dummy_sets: PyTree,
    features: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    head_features: PyTree | None = None,
):
    """``task_losses_and_penalty`` from given shared ``features`` (the encoder's output):
    ``(task_losses (T,), penalty, new heads batch_stats)``. With :func:`encode` it is the
    same objective, split where gradient methods take the per-task gradients.

    ``head_features``: what the task heads read, when not ``features`` (which the dummy
    sets read): the train step passes ``{task: features}``, one copy per task, so that one
    backward pass yields each task's gradient of the features separately."""
    images = batch["image"]
    outputs, updates = net.heads.apply(
        {"params": heads_params, "batch_stats": batch_stats.get("heads", {})},
        features if head_features is None else head_features,
        images.shape[1:3],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    per_task, penalty = _losses_and_penalty(net, tasks, dgr, dummy_sets, features, outputs, batch)
    return per_task, penalty, updates.get("batch_stats", {})


def paper_dgr_encoder_grads(
    net: MultiTaskNet,
    tasks: Sequence[Task],
    dgr: DGRConfig,
    params: PyTree,
    batch_stats: PyTree,
    dummy_sets: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    with_penalty: bool = False,
) -> PyTree:
    """The original code's DGR gradient for the encoder parameters.

    For dummy set d with loss L_d: ``g = grad_phi L_d``, ``G = grad_theta L_d(phi)``,
    ``phi+ = phi + (eps/||g||) g``, ``G+ = grad_theta L_d(phi+)``. With ``dgr.squared``
    the encoder gradient added is ``lambda/K * 2 (G+ - G)(L_d(phi+) - L_d(phi)) / eps^2``,
    an estimate of the gradient of ``||g||^2`` (the DGR repository's ``compute_hessian``);
    without, ``lambda/K * (G+ - G) / eps``, the same finite difference for ``||g||``.
    Each dummy set runs the whole model forward twice and backward twice through the
    encoder; nothing is shared between sets.

    On MTAN the original adds this gradient to the ResNet trunk only (its
    ``encoder_parameter()`` selects names containing "shared"), not to the attention
    masks and attention blocks; so does this function. The exact methods differentiate
    the penalty with respect to every encoder parameter.

    ``with_penalty``: return ``(grads, penalty)``, the penalty being the mean over the
    sets of ``||g||`` (``||g||^2`` with ``dgr.squared``) that the algorithm computes on the
    way: the value the other estimators report, for the run's curves.
    """
    images = batch["image"]
    losses = task_losses(tasks)
    apply_heads = heads_apply_fn(net.heads, images.shape[1:3])
    targets = {t.name: batch[t.name] for t in tasks}
    eps = dgr.fd_eps

    def dummy_loss(encoder_params, dummy_params):
        # The barrier keeps XLA from merging this forward pass with the other, identical
        # encoder forwards: the original algorithm runs the whole model again.
        encoder_params = jax.lax.optimization_barrier(encoder_params)
        features, _ = net.encoder.apply(
            {"params": encoder_params, "batch_stats": batch_stats["encoder"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        outputs = apply_heads(dummy_params, features)
        return sum(losses[name](outputs[name], targets[name]) for name in losses)

    def one_set(dummy_params):
        value, (g_theta, g_phi) = jax.value_and_grad(dummy_loss, argnums=(0, 1))(
            params["encoder"], dummy_params
        )
        norm = optax.tree.norm(g_phi)
        shifted = jax.tree_util.tree_map(lambda p, g: p + (eps / norm) * g, dummy_params, g_phi)
        value_plus, g_theta_plus = jax.value_and_grad(dummy_loss)(params["encoder"], shifted)
        scale = 2.0 * (value_plus - value) / eps**2 if dgr.squared else 1.0 / eps
        grads = jax.tree_util.tree_map(lambda gp, g: scale * (gp - g), g_theta_plus, g_theta)
        return grads, jnp.square(norm) if dgr.squared else norm

    # A Python loop, as the original. (Under lax.scan XLA:CPU ran this step ~10x slower.)
    per_set, norms = zip(
        *(
            one_set(jax.tree_util.tree_map(lambda a, k=k: a[k], dummy_sets))
            for k in range(dgr.num_dummy)
        )
    )
    summed = jax.tree_util.tree_map(lambda *gs: sum(gs), *per_set)
    grads = jax.tree_util.tree_map(lambda g: g * (dgr.weight / dgr.num_dummy), summed)
    if isinstance(net.encoder, MTANEncoder):
        grads = {
            name: (tree if name == "backbone" else jax.tree_util.tree_map(jnp.zeros_like, tree))
            for name, tree in grads.items()
        }
    if with_penalty:
        return grads, jax.lax.stop_gradient(sum(norms) / dgr.num_dummy)
    return grads


def repeat_running_stats_update(
    old: PyTree, updated: PyTree, repeats: int, momentum: float = MOMENTUM
) -> PyTree:
    """Running statistics after ``1 + repeats`` updates with the same batch statistics.

    ``updated = m * old + (1 - m) * b`` is one BatchNorm update. The original algorithm
    runs the whole model forward once more, in training mode, for each of its K dummy
    sets, with the same parameters on the same batch, so every BatchNorm layer (encoder
    and task heads) folds the same ``b`` in ``K + 1`` times per step:
    ``m^(K+1) old + (1 - m^(K+1)) b``, i.e. an effective momentum of ``1 - 0.9^(K+1)``
    (0.19 for K = 1) instead of 0.1.
    """
    if repeats == 0:
        return updated
    keep = momentum ** (repeats + 1)
    total = (1 - keep) / (1 - momentum)  # (1 - m^(K+1)) b = total * (1 - m) b

    def repeat(o, u):
        return keep * o + total * (u - momentum * o)

    return jax.tree_util.tree_map(repeat, old, updated)
