"""MTAN on a dilated backbone (the DeepLab version of auto-lambda, on ResNet-50).

At each of the four stages, task t computes an attention mask from the output of the
stage's blocks before its last one (``u_b``), concatenated from stage 2 on with its own
attended features of the previous stage; the mask multiplies the output of the stage's
last block (``u_t``). Shared bottleneck blocks map attended features between stages
(a 2x2 max-pool follows the first). Each task's head reads its attended stage-4
features, so the encoder's ``features`` are a dict ``{task: array}``.

Attention masks: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid (convs with bias,
PyTorch default init). The shared blocks are ResNet bottlenecks, as auto-lambda's. The
backbone is read through the protocol of ``models.backbones`` (stages, channels, blocks,
output stride).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dgr_jax.models.batch_norm import BatchNorm
from dgr_jax.models.heads import torch_conv
from dgr_jax.models.resnet import Bottleneck


class AttentionMask(nn.Module):
    hidden: int
    out: int
    norm: Any = BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = torch_conv(self.hidden, 1, x.shape[-1], use_bias=True, name="conv1")(x)
        x = nn.relu(self.norm(use_running_average=not train, name="bn1")(x))
        x = torch_conv(self.out, 1, self.hidden, use_bias=True, name="conv2")(x)
        return nn.sigmoid(self.norm(use_running_average=not train, name="bn2")(x))


class MTANEncoder(nn.Module):
    tasks: Sequence[str]
    backbone: nn.Module  # the protocol of models.backbones
    norm: Any = BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.backbone.output_stride != 8:
            raise ValueError(
                "MTAN: the backbone must be dilated (output_stride 8), "
                f"got output_stride {self.backbone.output_stride}"
            )
        sizes = self.backbone.stage_blocks
        if sizes[1] < 2:
            # Stage 2's mask reads the output of its blocks before the last; with one block
            # that is the stride-4 input, which cannot meet the pooled stage-1 features.
            raise ValueError(f"MTAN: stage 2 needs at least 2 blocks, got stage_sizes {sizes}")
        channels = self.backbone.stage_channels
        stages = self.backbone.stages(x, train, split_last=True)
        # Shared between tasks: bottleneck blocks from stage s's width to stage s+1's.
        norm = self.norm
        shared_blocks = [
            Bottleneck(channels[s + 1] // 4, norm=norm, name=f"shared_block{s + 1}")
            for s in range(3)
        ]
        attended = {}
        for s, (before_last, stage_out) in enumerate(stages):
            for task in self.tasks:
                inputs = (
                    before_last
                    if s == 0
                    else jnp.concatenate([before_last, attended[task]], axis=-1)
                )
                mask = AttentionMask(
                    channels[s] // 4, channels[s], norm, name=f"{task}_att{s + 1}"
                )(inputs, train)
                a = mask * stage_out
                if s < 3:
                    a = shared_blocks[s](a, train)
                if s == 0:
                    a = nn.max_pool(a, (2, 2), strides=(2, 2))
                attended[task] = a
        return attended
