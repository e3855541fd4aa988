"""Swin-T (Liu et al., "Swin Transformer", ICCV 2021) in torchvision's ``swin_t`` layout.

Patch embedding (4x4 conv, stride 4, then LayerNorm), four stages of Swin blocks
(LayerNorm, window attention with a relative position bias, residual; LayerNorm, MLP
with GELU, residual), every second block's windows shifted by half a window (with the
attention mask between regions that the shift made neighbours), patch merging (2x2
neighbours concatenated, LayerNorm, linear 4C -> 2C) between stages, and the final
LayerNorm. Feature maps that are not a multiple of the window are padded at the bottom
and right, and a window as large as the (padded) map is not shifted, as torchvision
does. Stochastic depth grows linearly to 0.2 over the blocks, row-wise, in training
with a ``dropout`` rng (the train step's) only. Swin has no dilated variant: Split's heads read
the last stage at stride 32 and upsample their outputs as for ResNet.

``base_width`` 64 is the real Swin-T (embedding width 96, 32 channels per attention
head); a smaller even ``base_width`` shrinks the widths by ``base_width / 64`` for tests
(heads 3, 6, 12, 24 kept). ``stage_sizes``: blocks per stage (default 2, 2, 6, 2).
NHWC throughout. ``torch_layout`` names each parameter's key in torchvision's state dict.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.models.backbones import register_backbone, register_torch_layout

WINDOW = 7
HEADS = (3, 6, 12, 24)
DEPTHS = (2, 2, 6, 2)
STOCHASTIC_DEPTH = 0.2

dense_init = nn.initializers.truncated_normal(0.02)


def layer_norm(name):
    return nn.LayerNorm(epsilon=1e-5, name=name)


def relative_position_index(window: int) -> np.ndarray:
    """``(N, N)`` indices into the ``((2w - 1)^2, heads)`` bias table, N = w^2."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    flat = coords.reshape(2, -1)
    relative = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shift_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
    """``(windows, N, N)``: 0 between tokens of the same region of the shifted map,
    -100 between regions the roll made neighbours."""
    regions = np.zeros((height, width), np.int32)
    count = 0
    for hs in (
        slice(0, -window),
        slice(-window, -shift[0] or None),
        slice(-shift[0] or None, None),
    ):
        for ws in (
            slice(0, -window),
            slice(-window, -shift[1] or None),
            slice(-shift[1] or None, None),
        ):
            regions[hs, ws] = count
            count += 1
    windows = regions.reshape(height // window, window, width // window, window)
    windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
    return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    dim: int
    heads: int
    shifted: bool

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        w = WINDOW
        pad_h, pad_w = (-height) % w, (-width) % w
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        ph, pw = height + pad_h, width + pad_w
        shift = (0 if w >= ph else w // 2, 0 if w >= pw else w // 2) if self.shifted else (0, 0)
        if any(shift):
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        windows = x.reshape(batch, ph // w, w, pw // w, w, channels).transpose(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, w * w, channels)
        qkv = nn.Dense(3 * self.dim, kernel_init=dense_init, name="qkv")(windows)
        qkv = qkv.reshape(windows.shape[0], w * w, 3, self.heads, channels // self.heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (windows * batch, heads, N, d)
        q = q * (channels // self.heads) ** -0.5
        table = self.param(
            "relative_position_bias_table", dense_init, ((2 * w - 1) ** 2, self.heads)
        )
        bias = table[relative_position_index(w).reshape(-1)].reshape(w * w, w * w, self.heads)
        attention = q @ k.swapaxes(-1, -2) + bias.transpose(2, 0, 1)[None]
        if any(shift):
            mask = jnp.asarray(shift_mask(ph, pw, w, shift))
            attention = attention.reshape(batch, -1, self.heads, w * w, w * w) + mask[None, :, None]
            attention = attention.reshape(-1, self.heads, w * w, w * w)
        out = jax.nn.softmax(attention, axis=-1) @ v
        out = out.swapaxes(1, 2).reshape(-1, w * w, channels)
        out = nn.Dense(self.dim, kernel_init=dense_init, name="proj")(out)
        out = out.reshape(batch, ph // w, pw // w, w, w, channels).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, ph, pw, channels)
        if any(shift):
            out = jnp.roll(out, shift, axis=(1, 2))
        return out[:, :height, :width]


class SwinBlock(nn.Module):
    dim: int
    heads: int
    shifted: bool
    drop_path: float

    def _drop(self, y, train):
        if not train or self.drop_path == 0.0 or not self.has_rng("dropout"):
            return y
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1)
        )
        return y * mask.astype(y.dtype) / keep

    @nn.compact
    def __call__(self, x, train: bool = True):
        y = WindowAttention(self.dim, self.heads, self.shifted, name="attn")(layer_norm("norm1")(x))
        x = x + self._drop(y, train)
        y = nn.Dense(4 * self.dim, kernel_init=dense_init, name="mlp_0")(layer_norm("norm2")(x))
        y = nn.Dense(self.dim, kernel_init=dense_init, name="mlp_3")(nn.gelu(y, approximate=False))
        return x + self._drop(y, train)


class PatchMerging(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        height, width = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        return nn.Dense(2 * self.dim, use_bias=False, kernel_init=dense_init, name="reduction")(
            layer_norm("norm")(x)
        )


class SwinTransformer(nn.Module):
    """The backbone protocol of ``models.backbones``; ``stages`` returns the four stage
    outputs (the last after the final LayerNorm)."""

    base_width: int = 64
    stage_sizes: Sequence[int] | None = None
    output_stride = 32

    @property
    def embed_dim(self) -> int:
        return self.base_width * 3 // 2

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        return tuple(self.stage_sizes or DEPTHS)

    @nn.compact
    def stages(self, x, train: bool = True, split_last: bool = False):
        if split_last:
            raise ValueError("swin_t: MTAN on Swin is not supported; use --network split")
        if self.base_width < 2 or self.base_width % 2:
            raise ValueError(f"swin_t: base_width must be even and >= 2, got {self.base_width}")
        sizes = self.stage_blocks
        if len(sizes) != 4 or min(sizes) < 1:
            raise ValueError(f"swin_t: stage_sizes must be four counts >= 1, got {sizes}")
        x = nn.Conv(self.embed_dim, (4, 4), strides=4, padding="VALID", name="patch_embed")(x)
        x = layer_norm("patch_norm")(x)
        total, index, outputs = sum(sizes), 0, []
        for stage, depth in enumerate(sizes):
            dim = self.stage_channels[stage]
            if stage > 0:
                x = PatchMerging(dim // 2, name=f"merge{stage}")(x)
            for b in range(depth):
                rate = STOCHASTIC_DEPTH * index / max(total - 1, 1)
                x = SwinBlock(dim, HEADS[stage], b % 2 == 1, rate, name=f"stage{stage + 1}_{b}")(
                    x, train
                )
                index += 1
            outputs.append(x)
        outputs[-1] = layer_norm("norm")(outputs[-1])
        return outputs

    def __call__(self, x, train: bool = True):
        return self.stages(x, train)[-1]


@register_backbone("swin_t", dilatable=False)
def build(config, norm):
    """torchvision's Swin-T (no dilated variant: its last stage is at stride 32)."""
    del norm  # LayerNorm throughout
    return SwinTransformer(
        config.base_width, tuple(config.stage_sizes) if config.stage_sizes else None
    )


def _identity(x):
    return x


def _linear(w):
    return w.T


@register_torch_layout("swin_t")
def torch_layout(path: tuple) -> tuple:
    """torchvision's ``swin_t`` key for a Flax path ``(collection, *names)``:
    ``features.0.0`` the patch conv, ``features.0.2`` its LayerNorm, ``features.{2s-1}.{b}``
    stage s's block b, ``features.{2s}`` the merging before stage s + 1, ``norm`` the last
    LayerNorm. Linear weights are transposed, the conv's OIHW -> HWIO."""
    *modules, leaf = path[1:]
    top = modules[0]
    if top == "patch_embed":
        prefix = "features.0.0"
    elif top == "patch_norm":
        prefix = "features.0.2"
    elif top == "norm":
        prefix = "norm"
    elif top.startswith("merge"):
        prefix = f"features.{2 * int(top[5:])}.{modules[1]}"
    else:  # stage{s}_{b}
        stage, block = top[5:].split("_")
        inner = {"mlp_0": "mlp.0", "mlp_3": "mlp.3"}
        rest = [inner.get(m, m) for m in modules[1:]]
        prefix = ".".join([f"features.{2 * int(stage) - 1}.{block}", *rest])
    if leaf == "kernel":
        if top == "patch_embed":
            return f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0)
        return f"{prefix}.weight", _linear
    if leaf == "scale":
        return f"{prefix}.weight", _identity
    return f"{prefix}.{leaf}", _identity
