"""ResNet-18/34/50/101 in the torchvision layout, with DeepLab's dilated variant.

Layout (torchvision, "v1.5"): 7x7 stride-2 stem conv, BN, ReLU, 3x3 stride-2 max-pool;
four stages of basic (18/34) or bottleneck (50/101) blocks; the stride sits on the 3x3
conv; the first block of a stage gets a 1x1 projection (conv + BN) when its shape
changes; convolutions before BN carry no bias. No classifier: the trunk ends at stage 4.

Dilated (``output_stride=8``), as DeepLab's ``ResnetDilated``: stages 3 and 4 lose
their stride; their 3x3 convs get dilation 2 and 4, except the first block of each,
whose formerly strided 3x3 conv gets half that (1 and 2). Padding equals dilation, so
spatial sizes match PyTorch exactly.

Initialisers follow torchvision: convs He-normal (fan_out, ReLU gain), BN scale 1 and
bias 0. Pretrained weights come from torchvision's state dicts through
``models.pretrained.encoder_from_torch`` (:func:`torch_layout` names each key); nothing
is downloaded here.

Data layout is NHWC. Every module takes ``norm``, the normalisation layer's constructor
(``models.batch_norm.BatchNorm``, PyTorch's semantics, by default).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn

from dgr_jax.models.backbones import register_backbone, register_torch_layout
from dgr_jax.models.batch_norm import BatchNorm

NormFactory = Callable[..., Any]

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, name: str | None = None):
    """PyTorch-style conv: symmetric padding ``dilation * (kernel // 2)``, no bias."""
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        use_bias=False,
        kernel_init=conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``width`` is the output width."""

    width: int
    stride: int = 1
    dilation: int = 1
    first_dilation: int = 1
    norm: NormFactory = BatchNorm
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = lambda name: self.norm(use_running_average=not train, name=name)  # noqa: E731
        out = conv(self.width, 3, self.stride, self.first_dilation, name="conv1")(x)
        out = nn.relu(norm("bn1")(out))
        out = conv(self.width, 3, 1, self.dilation, name="conv2")(out)
        out = norm("bn2")(out)
        return nn.relu(out + _shortcut(x, self.width, self.stride, norm))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand x4 (ResNet-50/101)."""

    width: int
    stride: int = 1
    dilation: int = 1
    first_dilation: int = 1
    norm: NormFactory = BatchNorm
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = lambda name: self.norm(use_running_average=not train, name=name)  # noqa: E731
        out = conv(self.width, 1, name="conv1")(x)
        out = nn.relu(norm("bn1")(out))
        out = conv(self.width, 3, self.stride, self.first_dilation, name="conv2")(out)
        out = nn.relu(norm("bn2")(out))
        out = conv(self.width * 4, 1, name="conv3")(out)
        out = norm("bn3")(out)
        return nn.relu(out + _shortcut(x, self.width * 4, self.stride, norm))


def _shortcut(x, features: int, stride: int, norm):
    if stride == 1 and x.shape[-1] == features:
        return x
    projection = conv(features, 1, stride, name="downsample_conv")(x)
    return norm("downsample_bn")(projection)


def stage_plan(depth: int, output_stride: int):
    """Per stage: (stride, dilation of the first block's 3x3, dilation of the rest)."""
    if output_stride == 32:
        return ((1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1))
    if output_stride == 8:
        return ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
    raise ValueError(
        f"ResNet-{depth}: output_stride must be 8 (dilated) or 32, got {output_stride}"
    )


class ResNet(nn.Module):
    """ResNet trunk (the backbone protocol of ``models.backbones``). ``__call__`` returns
    stage-4 features; ``stages`` returns all four.

    ``base_width`` (64 in the real networks) and ``stage_sizes`` shrink the model for
    tests and CPU runs without changing its structure.
    """

    depth: int = 50
    output_stride: int = 32
    base_width: int = 64
    stage_sizes: Sequence[int] | None = None
    norm: NormFactory = BatchNorm

    @property
    def stage_channels(self) -> tuple[int, ...]:
        expansion = 1 if self.depth < 50 else 4
        return tuple(self.base_width * 2**i * expansion for i in range(4))

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        return tuple(self.stage_sizes or STAGE_SIZES[self.depth])

    @nn.compact
    def stages(self, x, train: bool = True, split_last: bool = False):
        """Stem and four stages. Returns the four stage outputs; with ``split_last``,
        (output before the stage's last block, stage output) pairs, as MTAN needs."""
        if self.depth not in STAGE_SIZES:
            raise ValueError(
                f"ResNet: depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}"
            )
        sizes = self.stage_blocks
        if len(sizes) != 4 or min(sizes) < 1:
            raise ValueError(f"ResNet: stage_sizes must be four counts >= 1, got {sizes}")
        block_cls = BasicBlock if self.depth < 50 else Bottleneck
        x = conv(self.base_width, 7, 2, name="stem_conv")(x)
        x = nn.relu(self.norm(use_running_average=not train, name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        outputs = []
        plan = stage_plan(self.depth, self.output_stride)
        for index, (num_blocks, (stride, first_dil, dil)) in enumerate(zip(sizes, plan)):
            width = self.base_width * 2**index
            for b in range(num_blocks):
                block = block_cls(
                    width,
                    stride if b == 0 else 1,
                    dil,
                    first_dil if b == 0 else dil,
                    norm=self.norm,
                    name=f"layer{index + 1}_{b}",
                )
                if b == num_blocks - 1:
                    before_last = x
                x = block(x, train)
            outputs.append((before_last, x) if split_last else x)
        return outputs

    def __call__(self, x, train: bool = True):
        return self.stages(x, train)[-1]


def _register(depth: int):
    @register_backbone(f"resnet{depth}")
    def build(config, norm):
        """torchvision's ResNet-{depth}; dilated (DeepLab, output stride 8) when config.dilated."""
        return ResNet(
            depth,
            8 if config.dilated else 32,
            config.base_width,
            tuple(config.stage_sizes) if config.stage_sizes else None,
            norm=norm,
        )


_TORCH_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_TORCH_MODULES = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
}


def oihw_to_hwio(w):
    return w.transpose(2, 3, 1, 0)


def torch_layout(path: tuple) -> tuple:
    """torchvision's ResNet key for a Flax path ``(collection, *names)``:
    ``stem_conv`` -> ``conv1``, ``layer2_0/downsample_bn`` -> ``layer2.0.downsample.1``;
    a conv's ``kernel`` is its ``weight`` (OIHW -> HWIO), BatchNorm's ``scale``, ``bias``,
    ``mean``, ``var`` are ``weight``, ``bias``, ``running_mean``, ``running_var``."""
    *modules, leaf = path[1:]
    names = [_TORCH_MODULES.get(m, m.replace("_", ".")) for m in modules]
    if leaf == "kernel":
        return ".".join(names + ["weight"]), oihw_to_hwio
    return ".".join(names + [_TORCH_BN[leaf]]), lambda x: x


for _depth in STAGE_SIZES:
    _register(_depth)
    register_torch_layout(f"resnet{_depth}")(torch_layout)
