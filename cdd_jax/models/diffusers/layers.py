"""Layers shared by the diffusers ports, named exactly as diffusers names its submodules.

Every parameter carries the logical axis names of `cdd_jax.models.layers` (conv kernels
("conv_h", "conv_w", "channels_in", "channels_out"), dense kernels ("channels_in", "channels_out"),
biases ("channels_out",), norm scale/bias ("norm",)), so the sharding rules of
`cdd_jax.parallel.config` apply unchanged. A diffusers list entry `down_blocks.0` is the linen
module `down_blocks_0`; `weight` is `kernel` (convs HWIO, dense (in, out)) or `scale` (norms).
Activations are NHWC (images) or (batch, tokens, channels).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.models.layers import constrain

Dtype = Any
CONV_AXES = ("conv_h", "conv_w", "channels_in", "channels_out")
DENSE_AXES = ("channels_in", "channels_out")
_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("channels_out",))


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None, *,
         name: str, dtype: Dtype) -> nn.Conv:
    """`torch.nn.Conv2d(k, stride, padding)` in NHWC; padding defaults to (k - 1) // 2."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(_kernel_init, CONV_AXES),
                   bias_init=_bias_init)


def dense(features: int, use_bias: bool = True, *, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_kernel_init, DENSE_AXES),
                    bias_init=_bias_init)


def group_norm(groups: int, eps: float, *, name: str, dtype: Dtype) -> nn.GroupNorm:
    """`torch.nn.GroupNorm` (two-pass variance, so float32 matches PyTorch to rounding)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def layer_norm(eps: float, *, name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def activation(name: str):
    """The activations the ports support (diffusers `get_activation` names)."""
    if name in ("silu", "swish"):
        return nn.silu
    raise ValueError(f"act_fn {name!r} is not supported (supported: 'silu', 'swish')")


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10_000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding`: timesteps [B] in the checkpoint's units -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def broadcast_timesteps(timesteps, batch: int) -> jax.Array:
    """Scalar or [B] timesteps (int or float, checkpoint units) -> float32 [B]."""
    t = jnp.asarray(timesteps)
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or [batch], got shape {t.shape}")
    return jnp.broadcast_to(t.astype(jnp.float32).reshape(-1), (batch,))


def unet_time_embedding(cfg: dict, sample: jax.Array, timesteps, dtype: Dtype) -> jax.Array:
    """The U-Nets' common input check and time embedding, called inside a U-Net's compact method
    (so `time_embedding` is created in its scope): `sample` must be NHWC with H and W divisible
    by the total downsampling; timesteps (checkpoint units) -> `time_embedding` output [B, D]."""
    ch = cfg["block_out_channels"]
    n = len(ch)
    if sample.ndim != 4 or sample.shape[1] % 2 ** (n - 1) or sample.shape[2] % 2 ** (n - 1):
        raise ValueError(f"sample must be NHWC with H, W divisible by {2 ** (n - 1)}, "
                         f"got shape {sample.shape}")
    t = broadcast_timesteps(timesteps, sample.shape[0])
    t_emb = timestep_embedding(t, ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
    return TimestepEmbedding(cfg["time_embedding_dim"] or 4 * ch[0], dtype,
                             name="time_embedding")(t_emb)


class TimestepEmbedding(nn.Module):
    """`linear_1` -> SiLU -> `linear_2` (diffusers `TimestepEmbedding`)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = dense(self.dim, name="linear_1", dtype=self.dtype)(t_emb.astype(self.dtype))
        return dense(self.dim, name="linear_2", dtype=self.dtype)(nn.silu(h))


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with time_embedding_norm="default" (temb=None: no time input)."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, deterministic: bool = True):
        h = conv(self.out_channels, name="conv1", dtype=self.dtype)(
            nn.silu(group_norm(self.groups, self.eps, name="norm1", dtype=self.dtype)(x)))
        if temb is not None:
            temb = dense(self.out_channels, name="time_emb_proj", dtype=self.dtype)(nn.silu(temb))
            h = h + temb[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = conv(self.out_channels, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain(out)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv `conv`; padding 0 pads right/bottom by one first (the VAE's layout)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, 2, self.padding, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then the 3x3 conv `conv`."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, name="conv", dtype=self.dtype)(x)
