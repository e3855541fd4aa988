"""Hard-parameter-sharing networks: one shared encoder, one head per task.

``MultiTaskNet(encoder, heads)`` returns ``(features, outputs)``: ``features`` is what
every head (and every dummy set) reads; ``outputs`` maps task name to prediction. The
``encoder`` and ``heads`` submodules keep their own parameter subtrees
(``params["encoder"]``, ``params["heads"]``), so dummy sets are stacked copies of the
``heads`` subtree and are applied with ``net.heads.apply``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dgr_jax.models.heads import ClassifierHeads, DenseHeads
from dgr_jax.models.resnet import ResNet


class MultiTaskNet(nn.Module):
    encoder: nn.Module
    heads: nn.Module

    def __call__(self, x, train: bool = True):
        features = self.encoder(x, train=train)
        return features, self.heads(features, x.shape[1:3], train=train)


class PooledEncoder(nn.Module):
    """A ResNet trunk followed by global average pooling (classification)."""

    backbone: ResNet

    def __call__(self, x, train: bool = True):
        return jnp.mean(self.backbone(x, train=train), axis=(1, 2))


def split_network(tasks: Sequence[tuple[str, int]], backbone: ResNet, *, head_width: int = 256,
                  aspp_rates: Sequence[int] = (12, 24, 36), dropout_rate: float = 0.0,
                  unit_norm_tasks: Sequence[str] = ("normal",)) -> MultiTaskNet:
    """Split: a shared (dilated) ResNet, one DeepLabV3 head per dense task (heads use the
    backbone's normalisation layer)."""
    heads = DenseHeads(tuple(tasks), tuple(unit_norm_tasks), False, head_width, tuple(aspp_rates), dropout_rate,
                       backbone.norm)
    return MultiTaskNet(backbone, heads)


def classifier_network(tasks: Sequence[tuple[str, int]], backbone: ResNet, *, hidden: int = 64) -> MultiTaskNet:
    """Split for classification (UTKFace): pooled ResNet features, an MLP head per task."""
    return MultiTaskNet(PooledEncoder(backbone), ClassifierHeads(tuple(tasks), hidden))
