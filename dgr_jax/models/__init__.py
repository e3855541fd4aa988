"""Flax models: backbones, DeepLabV3/MLP heads, Split and MTAN networks.

Every network is a ``MultiTaskNet`` returning ``(features, outputs)``. Build one from a
``ModelConfig`` and a tuple of ``dgr_jax.tasks.Task``::

    net = build_model(ModelConfig(network="split", backbone="resnet50"), tasks.NYUV2)
    variables = net.init(key, images, train=False)
    features, outputs = net.apply(variables, images, train=False)

Backbones are found by name in ``backbones.BACKBONES`` (ResNet-18/34/50/101 register
themselves in ``resnet.py``); a new trunk is one module that registers itself.
``encoder_from_torch`` maps a torchvision state dict onto the encoder (``pretrained.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from dgr_jax.errors import ConfigError
from dgr_jax.models import resnet, swin  # noqa: F401  (register the ResNets and Swin-T)
from dgr_jax.models.backbones import BACKBONES, UNDILATED, backbone_name, register_backbone
from dgr_jax.models.batch_norm import BatchNorm, batch_norm_factory
from dgr_jax.models.heads import (
    ClassifierHeads,
    DeepLabHead,
    DenseHeads,
    bilinear_resize_align_corners,
)
from dgr_jax.models.mtan import AttentionMask, MTANEncoder
from dgr_jax.models.pretrained import encoder_from_torch, with_pretrained_encoder
from dgr_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from dgr_jax.models.split import MultiTaskNet, PooledEncoder

NETWORKS = ("split", "mtan", "classifier")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are the paper's full-size networks.

    ``backbone``: a name of ``BACKBONES`` (``"resnet50"``; a bare depth such as 50 is
    accepted). ``base_width``/``stage_sizes``/``head_width`` shrink a model for tests and
    CPU runs without changing its structure (``base_width=64``, ``stage_sizes=None`` and
    ``head_width=256`` are the real ResNets and DeepLabV3 heads).
    """

    network: str = "split"
    backbone: str = "resnet50"
    dilated: bool | None = (
        None  # None: dilated (output stride 8) for split / mtan, not for the classifier
    )
    base_width: int = 64
    stage_sizes: tuple[int, ...] | None = None
    head_width: int = 256
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    # The original code (auto-lambda's DeepLabHead) has no dropout; torchvision's has 0.5.
    dropout_rate: float = 0.0
    # The classifier heads' hidden width (Linear-ReLU-Linear); 0: one Linear layer.
    classifier_hidden: int = 64
    # BatchNorm running variance: unbiased n/(n-1) update as PyTorch (the original), or
    # Flax's biased one.
    bn_unbiased_running_var: bool = True

    def __post_init__(self):
        if self.network not in NETWORKS:
            raise ConfigError(
                "ModelConfig", "network", f"must be one of {NETWORKS}, got {self.network!r}"
            )
        try:
            object.__setattr__(self, "backbone", backbone_name(self.backbone))
        except ValueError:
            raise ConfigError(
                "ModelConfig",
                "backbone",
                f"must be one of {', '.join(sorted(BACKBONES))}, got {self.backbone!r}",
            ) from None
        if self.dilated is None:
            dilatable = self.backbone not in UNDILATED
            object.__setattr__(self, "dilated", self.network != "classifier" and dilatable)
        elif self.dilated and self.backbone in UNDILATED:
            raise ConfigError("ModelConfig", "dilated", f"{self.backbone!r} has no dilated variant")
        if self.network == "mtan" and not self.dilated:
            why = (
                f"; {self.backbone} has no dilated variant"
                if self.backbone in UNDILATED
                else " (dilated=True)"
            )
            raise ConfigError("ModelConfig", "network", f"'mtan' needs a dilated backbone{why}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(
                "ModelConfig", "dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
            )
        for name in ("base_width", "head_width"):
            if getattr(self, name) < 1:
                raise ConfigError("ModelConfig", name, f"must be >= 1, got {getattr(self, name)}")
        if self.classifier_hidden < 0:
            raise ConfigError(
                "ModelConfig", "classifier_hidden", f"must be >= 0, got {self.classifier_hidden}"
            )


def build_model(config: ModelConfig, tasks: Sequence[Any]) -> MultiTaskNet:
    """``tasks``: ``dgr_jax.tasks.Task`` records; each head's output activation comes from
    its task's kind."""
    norm = batch_norm_factory(config.bn_unbiased_running_var)
    backbone = BACKBONES[config.backbone](config, norm)
    pairs = tuple((task.name, task.channels) for task in tasks)
    if config.network == "classifier":
        return MultiTaskNet(
            PooledEncoder(backbone), ClassifierHeads(pairs, config.classifier_hidden)
        )
    activations = tuple(
        (task.name, task.record.activation) for task in tasks if task.record.activation
    )
    mtan = config.network == "mtan"
    heads = DenseHeads(
        pairs,
        activations,
        width=config.head_width,
        rates=tuple(config.aspp_rates),
        dropout_rate=config.dropout_rate,
        norm=norm,
    )
    encoder = MTANEncoder(tuple(task.name for task in tasks), backbone, norm) if mtan else backbone
    return MultiTaskNet(encoder, heads)


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
            {"params": params},
            features,
            output_size,
            train=train,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return outputs

    return apply


def _without_dropout(heads: nn.Module) -> nn.Module:
    if hasattr(heads, "dropout_rate"):
        return heads.clone(dropout_rate=0.0)
    return heads


__all__ = [
    "AttentionMask",
    "BACKBONES",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ClassifierHeads",
    "DeepLabHead",
    "DenseHeads",
    "MTANEncoder",
    "ModelConfig",
    "MultiTaskNet",
    "NETWORKS",
    "PooledEncoder",
    "ResNet",
    "backbone_name",
    "bilinear_resize_align_corners",
    "build_model",
    "count_params",
    "encoder_from_torch",
    "heads_apply_fn",
    "register_backbone",
    "with_pretrained_encoder",
]
