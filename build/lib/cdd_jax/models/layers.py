"""Building blocks of the U-Net, every parameter annotated with logical axis names.

Logical names (mapped to mesh axes by `cdd_jax.parallel`):
  conv kernels ("conv_h", "conv_w", "channels_in", "channels_out"), dense kernels
  ("channels_in", "channels_out"), biases ("channels_out",), norm scale/bias ("norm",).
Activations are constrained to ("batch", "height", "width", "channels").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACT_AXES = ("batch", "height", "width", "channels")

_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def constrain(x: jax.Array) -> jax.Array:
    """Logical sharding constraint on an NHWC activation (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, ACT_AXES)


class Conv(nn.Module):
    """NHWC convolution with logically-partitioned kernel and bias."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _default_init
        return nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding="SAME",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                init, ("conv_h", "conv_w", "channels_in", "channels_out")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels_out",)),
        )(x)


class Dense(nn.Module):
    """Dense layer with logically-partitioned kernel and bias."""

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _default_init
        return nn.Dense(
            self.features,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(init, ("channels_in", "channels_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels_out",)),
        )(x)


class GroupNorm(nn.Module):
    """GroupNorm whose group count adapts to narrow layers (largest divisor <= num_groups)."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        groups = max(g for g in range(1, min(self.num_groups, c) + 1) if c % g == 0)
        return nn.GroupNorm(
            num_groups=groups,
            dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        )(x)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of continuous time t in [0, 1] (scaled by 1000, as in DDPM)."""
    t = jnp.asarray(t, jnp.float32) * 1000.0
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimeEmbedding(nn.Module):
    """t -> sinusoid -> Dense(4ch) -> SiLU -> Dense(4ch)."""

    ch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.ch)
        emb = Dense(4 * self.ch, dtype=self.dtype)(emb)
        return Dense(4 * self.ch, dtype=self.dtype)(nn.silu(emb))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, time-embedding shift, GroupNorm-SiLU-Dropout-Conv(zero), skip."""

    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(GroupNorm(self.num_groups, self.dtype)(x))
        h = Conv(self.out_ch, dtype=self.dtype)(h)
        h = h + Dense(self.out_ch, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(GroupNorm(self.num_groups, self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = Conv(self.out_ch, zero_init=True, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_ch:
            x = Conv(self.out_ch, kernel_size=1, dtype=self.dtype)(x)
        return constrain(x + h)


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, zero-initialised output projection."""

    head_dim: int = 32
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads = max(1, c // self.head_dim)
        h = GroupNorm(self.num_groups, self.dtype)(x).reshape(b, hgt * wid, c)
        qkv = Dense(3 * c, dtype=self.dtype)(h).reshape(b, hgt * wid, 3, heads, c // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // heads)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, c)
        out = Dense(c, zero_init=True, dtype=self.dtype)(out)
        return constrain(x + out.reshape(b, hgt, wid, c))


class Downsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(x.shape[-1], strides=2, dtype=self.dtype)(x)


class Upsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return Conv(c, dtype=self.dtype)(x)
