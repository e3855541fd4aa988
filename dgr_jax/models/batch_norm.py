"""BatchNorm with PyTorch's semantics, running variance included.

Flax's ``nn.BatchNorm`` and ``torch.nn.BatchNorm2d`` normalise a training batch the same
way (biased batch variance), but they update the running variance differently: Flax
with the biased variance, PyTorch with the unbiased one, ``var * n / (n - 1)`` for ``n``
reduced elements per channel. Evaluation normalises with the running statistics, so the
two frameworks evaluate the same weights differently, most of all where ``n`` is small
(ASPP's image-pooling branch reduces over the batch alone: ``n / (n - 1) = 4 / 3`` at
batch 4). The original code is PyTorch, so ``unbiased_running_var=True`` is the default.

Parameters and statistics keep Flax's names (``scale``, ``bias``; ``batch_stats``
``mean``, ``var``). The variance is the two-pass ``mean((x - mean)^2)``: the one-pass
``mean(x^2) - mean^2`` cancels catastrophically in float32 when a channel's spread is
small next to its mean, and the penalty's second derivatives amplify that error.
Statistics are computed in at least float32.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MOMENTUM = 0.9  # Flax's convention: running = 0.9 running + 0.1 batch (PyTorch's momentum 0.1)
EPSILON = 1e-5


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d(momentum=0.1, eps=1e-5)`` over the last (channel) axis.

    ``unbiased_running_var``: update the running variance with ``n / (n - 1)`` times the
    batch variance, as PyTorch (default); False: with the batch variance, as Flax. A
    training batch with ``n = 1`` element per channel (PyTorch refuses it) updates with
    the batch variance.
    """

    use_running_average: bool = False
    momentum: float = MOMENTUM
    epsilon: float = EPSILON
    unbiased_running_var: bool = True

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32)
        )
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        channel_shape = (1,) * (x.ndim - 1) + (
            channels,
        )  # explicit broadcasting (no rank promotion)
        if self.use_running_average:
            mean, var = running_mean.value.astype(dtype), running_var.value.astype(dtype)
        else:
            axes = tuple(range(x.ndim - 1))
            x_stats = x.astype(dtype)
            mean = jnp.mean(x_stats, axes)
            var = jnp.mean(jnp.square(x_stats - mean.reshape(channel_shape)), axes)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                correction = count / (count - 1) if self.unbiased_running_var and count > 1 else 1.0
                keep = self.momentum
                running_mean.value = keep * running_mean.value + (1 - keep) * jax.lax.stop_gradient(
                    mean
                )
                running_var.value = keep * running_var.value + (
                    1 - keep
                ) * correction * jax.lax.stop_gradient(var)
        multiplier = (jax.lax.rsqrt(var + self.epsilon) * scale).reshape(channel_shape)
        y = (x.astype(dtype) - mean.reshape(channel_shape)) * multiplier + bias.reshape(
            channel_shape
        )
        return y.astype(jnp.promote_types(x.dtype, scale.dtype))


def batch_norm_factory(unbiased_running_var: bool = True):
    """The ``norm`` that models take and call as ``norm(use_running_average=..., name=...)``."""
    return functools.partial(BatchNorm, unbiased_running_var=unbiased_running_var)
