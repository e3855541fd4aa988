"""Task heads: DeepLabV3 (ASPP) for dense tasks, a two-layer MLP (or one linear layer) for
classification.

A *heads* module maps shared features to a dict of per-task outputs. The same module
class builds the trained task heads and the dummy sets, so dummy sets have the task
heads' architecture and initialiser by construction.

Every heads module keeps task ``t``'s parameters (and BatchNorm statistics) in the
subtree named ``t``, and reads its features either from one array shared by every head
(Split) or from a dict ``{task: array}`` (MTAN's per-task features; the train step also
passes per-task *copies* of a shared array, so that one backward pass gives each task's
gradient of the features apart).

Initialisers follow PyTorch's defaults for these layers (torchvision's DeepLabHead and
``nn.Linear`` do not override them): kernels uniform in +-1/sqrt(fan_in)
(``kaiming_uniform(a=sqrt(5))``), biases uniform in +-1/sqrt(fan_in); BN scale 1, bias 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.models.batch_norm import BatchNorm

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TrimmedConv(nn.Module):
    """A square, stride-1 convolution with symmetric padding ``dilation * (kernel // 2)``
    that skips the kernel taps which can only ever meet the zero padding.

    With dilation ``d`` on a spatial size ``S``, a tap at offset ``k * d`` overlaps the
    input only if ``|k| * d < S``; ASPP's rates 12/24/36 on a 12x16 (or 36x48) feature
    map leave most taps in the padding. Those taps multiply zeros, so dropping them gives
    the same output and the same gradients (zero for the skipped taps) with a fraction of
    the FLOPs, forward and in every derivative. Parameters are those of ``nn.Conv``
    (``kernel`` of shape ``(k, k, in, out)``, optional ``bias``).
    """

    features: int
    kernel: int
    dilation: int = 1
    use_bias: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (self.kernel, self.kernel, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        half = self.kernel // 2
        padding, window = [], []
        for size in x.shape[1:3]:
            # Keep offsets |k| <= reach, the taps that can land inside the input.
            reach = min(half, (size - 1) // self.dilation)
            padding.append((reach * self.dilation, reach * self.dilation))
            window.append(slice(half - reach, half + reach + 1))
        y = jax.lax.conv_general_dilated(
            x,
            kernel[window[0], window[1]],
            window_strides=(1, 1),
            padding=padding,
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if bias is not None:
            y = y + bias.reshape(1, 1, 1, -1)
        return y


def torch_conv(
    features: int,
    kernel: int,
    in_features: int,
    *,
    dilation: int = 1,
    use_bias: bool = False,
    name: str | None = None,
):
    """A conv with PyTorch's default init and symmetric padding ``dilation * (k // 2)``
    (``TrimmedConv``: taps that only meet padding are skipped)."""
    return TrimmedConv(
        features,
        kernel,
        dilation=dilation,
        use_bias=use_bias,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features * kernel * kernel),
        name=name,
    )


def torch_dense(features: int, in_features: int, name: str | None = None):
    return nn.Dense(
        features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features), name=name
    )


class DeepLabHead(nn.Module):
    """DeepLabV3 head: ASPP (1x1, three dilated 3x3, image pooling; each ``width``
    channels with BN+ReLU) -> concat -> 1x1 projection (BN, ReLU) -> 3x3 conv (BN, ReLU)
    -> 1x1 conv with bias to ``num_outputs``, as auto-lambda's ``DeepLabHead`` (the
    original code's). ``dropout_rate > 0`` adds torchvision's dropout after the
    projection (torchvision's DeepLabHead uses 0.5; the original code has none)."""

    num_outputs: int
    width: int = 256
    rates: Sequence[int] = (12, 24, 36)
    dropout_rate: float = 0.0
    norm: Any = BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        def conv_bn_relu(inputs, kernel, dilation, name):
            y = torch_conv(
                self.width, kernel, inputs.shape[-1], dilation=dilation, name=f"{name}_conv"
            )(inputs)
            return nn.relu(self.norm(use_running_average=not train, name=f"{name}_bn")(y))

        branches = [conv_bn_relu(x, 1, 1, "aspp_1x1")]
        branches += [conv_bn_relu(x, 3, rate, f"aspp_rate{rate}") for rate in self.rates]
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = conv_bn_relu(pooled, 1, 1, "aspp_pool")
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.width,)))
        y = conv_bn_relu(jnp.concatenate(branches, axis=-1), 1, 1, "aspp_project")
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv_bn_relu(y, 3, 1, "conv")
        return torch_conv(self.num_outputs, 1, self.width, use_bias=True, name="classifier")(y)


def bilinear_resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size`` with align_corners=True semantics
    (corner pixels of input and output coincide), as ``F.interpolate(...,
    align_corners=True)``. Two small interpolation matrices, so it is cheap to
    differentiate any number of times."""

    def weights(out_size: int, in_size: int) -> np.ndarray:
        if out_size == 1 or in_size == 1:
            positions = np.zeros(out_size)
        else:
            positions = np.arange(out_size) * (in_size - 1) / (out_size - 1)
        low = np.clip(np.floor(positions).astype(int), 0, in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        frac = positions - low
        matrix = np.zeros((out_size, in_size))
        np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
        np.add.at(matrix, (np.arange(out_size), high), frac)
        return matrix

    out_h, out_w = size
    rows = jnp.asarray(weights(out_h, x.shape[1]), x.dtype)
    cols = jnp.asarray(weights(out_w, x.shape[2]), x.dtype)
    return jnp.einsum("Hh,nhwc,Ww->nHWc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


class DenseHeads(nn.Module):
    """One DeepLabV3 head per dense task; outputs bilinearly upsampled (align_corners)
    to ``output_size``, then passed through the task's activation (``activations``:
    ``(task, fn)`` pairs, from its kind; normals are L2-normalised per pixel).

    ``features`` is one array read by every head (Split), or a dict ``{task: array}``
    (MTAN).
    """

    tasks: Sequence[tuple[str, int]]
    activations: Sequence[tuple[str, Any]] = ()
    width: int = 256
    rates: Sequence[int] = (12, 24, 36)
    dropout_rate: float = 0.0
    norm: Any = BatchNorm

    @nn.compact
    def __call__(
        self, features, output_size: tuple[int, int], train: bool = True
    ) -> Mapping[str, jax.Array]:
        activations = dict(self.activations)
        outputs = {}
        for task, channels in self.tasks:
            z = features[task] if isinstance(features, Mapping) else features
            y = DeepLabHead(
                channels, self.width, self.rates, self.dropout_rate, self.norm, name=task
            )(z, train)
            y = bilinear_resize_align_corners(y, tuple(output_size))
            outputs[task] = activations[task](y) if task in activations else y
        return outputs


class ClassifierHead(nn.Module):
    """Linear(features -> hidden), ReLU, Linear(hidden -> classes) (``fc1``, ``fc2``);
    ``hidden=0``: one Linear(features -> classes) named ``fc`` (torchvision's ResNet
    classifier, ImageNet's head)."""

    classes: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        if self.hidden == 0:
            return torch_dense(self.classes, x.shape[-1], name="fc")(x)
        h = nn.relu(torch_dense(self.hidden, x.shape[-1], name="fc1")(x))
        return torch_dense(self.classes, self.hidden, name="fc2")(h)


class ClassifierHeads(nn.Module):
    """One :class:`ClassifierHead` per task (UTKFace, MultiDigits: an MLP; ImageNet:
    ``hidden=0``, one linear layer); ``features`` is one ``(batch, channels)`` array or a
    dict ``{task: array}``."""

    tasks: Sequence[tuple[str, int]]
    hidden: int = 64

    @nn.compact
    def __call__(self, features, output_size=None, train: bool = True) -> Mapping[str, jax.Array]:
        del output_size, train  # no spatial output, no BatchNorm
        return {
            task: ClassifierHead(classes, self.hidden, name=task)(
                features[task] if isinstance(features, Mapping) else features
            )
            for task, classes in self.tasks
        }
