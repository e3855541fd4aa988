"""Flax models: dilated ResNets, DeepLabV3/MLP heads, Split and MTAN networks.

Every network is a ``MultiTaskNet`` returning ``(features, outputs)``. Build one from a
``ModelConfig`` and a tuple of ``dgr_jax.tasks.Task``::

    net = build_model(ModelConfig(network="split"), tasks.NYUV2)
    variables = net.init(key, images, train=False)
    features, outputs = net.apply(variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from dgr_jax.models.batch_norm import BatchNorm, batch_norm_factory
from dgr_jax.models.heads import (
    ClassifierHeads,
    DeepLabHead,
    DenseHeads,
    bilinear_resize_align_corners,
    unit_normalize,
)
from dgr_jax.models.mtan import AttentionMask, MTANEncoder, mtan_network
from dgr_jax.models.resnet import STAGE_SIZES, BasicBlock, Bottleneck, ResNet
from dgr_jax.models.split import MultiTaskNet, PooledEncoder, classifier_network, split_network

NETWORKS = ("split", "mtan", "classifier")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are the paper's full-size networks.

    ``base_width``/``stage_sizes``/``head_width`` shrink a model for tests and CPU runs
    without changing its structure (``base_width=64``, ``stage_sizes=None`` and
    ``head_width=256`` are the real ResNets and DeepLabV3 heads).
    """

    network: str = "split"
    depth: int = 50
    dilated: bool = True
    base_width: int = 64
    stage_sizes: tuple[int, ...] | None = None
    head_width: int = 256
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    # The original code (auto-lambda's DeepLabHead) has no dropout; torchvision's has 0.5.
    dropout_rate: float = 0.0
    classifier_hidden: int = 64
    # BatchNorm running variance: unbiased n/(n-1) update as PyTorch (the original), or
    # Flax's biased one.
    bn_unbiased_running_var: bool = True

    def __post_init__(self):
        if self.network not in NETWORKS:
            raise ValueError(f"ModelConfig: network must be one of {NETWORKS}, got {self.network!r}")
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ModelConfig: depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        if self.network == "mtan" and not self.dilated:
            raise ValueError("ModelConfig: network 'mtan' needs a dilated backbone (dilated=True)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"ModelConfig: dropout_rate must be in [0, 1), got {self.dropout_rate}")


def build_model(config: ModelConfig, tasks: Sequence[Any]) -> MultiTaskNet:
    """``tasks``: ``dgr_jax.tasks.Task`` records (name, channels, kind)."""
    backbone = ResNet(
        config.depth,
        8 if config.dilated else 32,
        config.base_width,
        tuple(config.stage_sizes) if config.stage_sizes else None,
        norm=batch_norm_factory(config.bn_unbiased_running_var),
    )
    pairs = tuple((task.name, task.channels) for task in tasks)
    if config.network == "classifier":
        return classifier_network(pairs, backbone, hidden=config.classifier_hidden)
    unit_norm = tuple(task.name for task in tasks if task.kind == "normal")
    build = split_network if config.network == "split" else mtan_network
    return build(pairs, backbone, head_width=config.head_width, aspp_rates=config.aspp_rates,
                 dropout_rate=config.dropout_rate, unit_norm_tasks=unit_norm)


def count_params(tree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def heads_apply_fn(heads: nn.Module, output_size: tuple[int, int] | None, *, train: bool = True):
    """``apply(params, features, rng=None) -> outputs`` for one set of head parameters.

    In training mode BatchNorm uses batch statistics and the updated running
    statistics are dropped: this is how dummy sets run inside the penalty.
    Dropout draws from ``rng`` when given, and is off when ``rng`` is None.
    """

    def apply(params, features, rng=None):
        rngs = {"dropout": rng} if rng is not None else None
        deterministic_heads = heads if rng is not None or not train else _without_dropout(heads)
        outputs, _ = deterministic_heads.apply(
            {"params": params}, features, output_size, train=train, mutable=["batch_stats"], rngs=rngs
        )
        return outputs

    return apply


def _without_dropout(heads: nn.Module) -> nn.Module:
    if hasattr(heads, "dropout_rate"):
        return heads.clone(dropout_rate=0.0)
    return heads


__all__ = [
    "AttentionMask", "BasicBlock", "BatchNorm", "Bottleneck", "ClassifierHeads", "DeepLabHead", "DenseHeads",
    "MTANEncoder", "ModelConfig", "MultiTaskNet", "NETWORKS", "PooledEncoder", "ResNet",
    "bilinear_resize_align_corners", "build_model", "classifier_network", "count_params",
    "heads_apply_fn", "mtan_network", "split_network", "unit_normalize",
]
