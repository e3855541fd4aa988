"""Hard-parameter-sharing networks: one shared encoder, one head per task.

``MultiTaskNet(encoder, heads)`` returns ``(features, outputs)``: ``features`` is what
every head (and every dummy set) reads; ``outputs`` maps task name to prediction. The
``encoder`` and ``heads`` submodules keep their own parameter subtrees
(``params["encoder"]``, ``params["heads"]``), so dummy sets are stacked copies of the
``heads`` subtree and are applied with ``net.heads.apply``. ``models.build_model``
assembles Split (a backbone read by every head), MTAN (``mtan.MTANEncoder``) and the
classifier (``PooledEncoder``) from a ``ModelConfig``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MultiTaskNet(nn.Module):
    encoder: nn.Module
    heads: nn.Module

    def __call__(self, x, train: bool = True):
        features = self.encoder(x, train=train)
        return features, self.heads(features, x.shape[1:3], train=train)


class PooledEncoder(nn.Module):
    """A backbone followed by global average pooling (classification)."""

    backbone: nn.Module

    def __call__(self, x, train: bool = True):
        return jnp.mean(self.backbone(x, train=train), axis=(1, 2))
