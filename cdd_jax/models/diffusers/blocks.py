"""Layers shared by the diffusers ports, named exactly as diffusers names its submodules.

Every parameter carries the logical axis names of `cdd_jax.models.layers` (conv kernels
("conv_h", "conv_w", "channels_in", "channels_out"), dense kernels ("channels_in", "channels_out"),
biases ("channels_out",), norm scale/bias ("norm",)), so the sharding rules of
`cdd_jax.parallel.config` apply unchanged. A diffusers list entry `down_blocks.0` is the linen
module `down_blocks_0`; `weight` is `kernel` (convs HWIO, dense (in, out)) or `scale` (norms).
Activations are NHWC (images) or (batch, tokens, channels).
"""

from __future__ import annotations

import json
import logging
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


def dot_product_attention(q, k, v, heads: int, upcast: bool):
    """Multi-head softmax attention on [B, N, heads*d]; the softmax always runs in float32."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (a.reshape(a.shape[0], a.shape[1], heads, d) for a in (q, k, v))
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, inner)


class Attention(nn.Module):
    """diffusers `Attention` (AttnProcessor): optional `group_norm`, `to_q/k/v`, `to_out_0`.

    Takes NHWC or [B, N, C]; `context` (encoder_hidden_states) feeds keys and values.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        h = x
        if self.norm_groups is not None:
            h = group_norm(self.norm_groups, self.eps, name="group_norm", dtype=self.dtype)(h)
        ctx = h if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head
        q = dense(inner, self.qkv_bias, name="to_q", dtype=self.dtype)(h)
        k = dense(inner, self.qkv_bias, name="to_k", dtype=self.dtype)(ctx)
        v = dense(inner, self.qkv_bias, name="to_v", dtype=self.dtype)(ctx)
        out = dot_product_attention(q, k, v, self.heads, self.upcast)
        out = dense(shape[-1], name="to_out_0", dtype=self.dtype)(out)
        if self.residual_connection:
            out = out + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out.reshape(shape)


class GEGLU(nn.Module):
    """`proj` to 2*inner, split, value * gelu(gate) (exact erf GELU, as PyTorch's default)."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(dense(2 * self.inner, name="proj", dtype=self.dtype)(x), 2, -1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`net_0` (GEGLU, 4x width) -> `net_2` (dense back to dim)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, self.dtype, name="net_0")(x)
        return dense(dim, name="net_2", dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """LayerNorm-self-attention, LayerNorm-cross-attention, LayerNorm-GEGLU feed-forward."""

    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast,
                                      dtype=self.dtype, name=name)
        x = attn("attn1")(layer_norm(1e-5, name="norm1", dtype=self.dtype)(x)) + x
        x = attn("attn2")(layer_norm(1e-5, name="norm2", dtype=self.dtype)(x), context) + x
        return FeedForward(self.dtype, name="ff")(layer_norm(1e-5, name="norm3",
                                                             dtype=self.dtype)(x)) + x


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input, linear or 1x1-conv projections."""

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        proj = ((lambda f, name: dense(f, name=name, dtype=self.dtype))
                if self.use_linear_projection
                else (lambda f, name: conv(f, 1, name=name, dtype=self.dtype)))
        h = group_norm(self.norm_groups, 1e-6, name="norm", dtype=self.dtype)(x)
        h = proj(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block(self.heads, self.dim_head, self.upcast, self.dtype,
                      name=f"transformer_blocks_{i}")(h, context)
        h = proj(c, "proj_out")(h.reshape(b, hgt, wid, inner))
        return constrain(h + x)


def resnet_block(remat: bool):
    """`ResnetBlock2D`, rematerialised in the backward pass when `remat`."""
    return nn.remat(ResnetBlock2D, static_argnums=(3,)) if remat else ResnetBlock2D


def per_level(value, n: int, key: str) -> tuple:
    """A config value given as one entry or one per level -> a tuple of n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n


def reject_unsupported(cfg: dict, allowed: dict, class_name: str) -> None:
    """ValueError naming every config key whose value the port does not implement."""
    bad = [f"{k}={cfg[k]!r} (supported: {', '.join(map(repr, ok))})"
           for k, ok in allowed.items() if k in cfg and cfg[k] not in ok]
    if bad:
        raise ValueError(f"{class_name} config not supported by the cdd_jax port: "
                         + "; ".join(bad))


def check_block_types(kind: str, types, supported: tuple) -> None:
    for t in types:
        if t not in supported:
            raise ValueError(f"unsupported {kind} block type {t!r}; the cdd_jax port supports "
                             f"{', '.join(supported)}")


def canonical_config(class_name: str, defaults: dict, cfg: dict) -> str:
    """diffusers config dict (defaults filled, private keys dropped) as sorted JSON.

    Keys this diffusers class does not have are dropped with a warning, as diffusers does.
    """
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
    if unknown:
        logging.warning("%s config: ignoring keys unknown to diffusers 0.42: %s",
                        class_name, unknown)
    full = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    full = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
    return json.dumps({"_class_name": class_name, **full}, sort_keys=True)



class BlockAttention(nn.Module):
    """Fields shared by the down, mid and up blocks that describe their attention layers.

    attn: None (resnets only), "self" (diffusers `Attention`: heads = channels // dim_head, a
    dim_head of None means one head) or "cross" (`Transformer2DModel` with `heads` heads).
    """

    attn: str | None = None
    heads: int | None = None
    dim_head: int | None = None
    attn_groups: int | None = None
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast: bool = False
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    def resnet(self, channels: int, name: str):
        return resnet_block(self.remat)(channels, self.groups, self.eps, self.output_scale_factor,
                                        self.dropout, self.dtype, name=name)

    def attention(self, h: jax.Array, context: jax.Array | None, name: str) -> jax.Array:
        c = h.shape[-1]
        if self.attn == "self":
            dim_head = self.dim_head or c
            return Attention(c // dim_head, dim_head, qkv_bias=True, norm_groups=self.attn_groups,
                             eps=self.eps, residual_connection=True,
                             rescale_output_factor=self.output_scale_factor, dtype=self.dtype,
                             name=name)(h)
        return Transformer2DModel(self.heads, c // self.heads, self.transformer_layers,
                                  self.groups, self.use_linear_projection, self.upcast,
                                  self.remat, self.dtype, name=name)(h, context)


class DownBlock(BlockAttention):
    """DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D / DownEncoderBlock2D.

    Returns (h, outputs): the hidden state and the skip features it contributes.
    """

    out_channels: int = 0
    num_layers: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h, temb, context=None, deterministic: bool = True):
        outputs = []
        for j in range(self.num_layers):
            h = self.resnet(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.attn is not None:
                h = self.attention(h, context, f"attentions_{j}")
            outputs.append(h)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.downsample_padding, self.dtype,
                             name="downsamplers_0")(h)
            outputs.append(h)
        return h, tuple(outputs)


class UpBlock(BlockAttention):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D (skips: deepest last) / UpDecoderBlock2D
    (skips=None)."""

    out_channels: int = 0
    num_layers: int = 1
    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context=None, deterministic: bool = True):
        skips = list(skips) if skips is not None else None
        for j in range(self.num_layers):
            if skips is not None:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self.resnet(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.attn is not None:
                h = self.attention(h, context, f"attentions_{j}")
        if self.add_upsample:
            h = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(h)
        return h


class MidBlock(BlockAttention):
    """UNetMidBlock2D / UNetMidBlock2DCrossAttn: resnet, then (attention, resnet)."""

    @nn.compact
    def __call__(self, h, temb, context=None, deterministic: bool = True):
        c = h.shape[-1]
        h = self.resnet(c, "resnets_0")(h, temb, deterministic)
        if self.attn is not None:
            h = self.attention(h, context, "attentions_0")
        return self.resnet(c, "resnets_1")(h, temb, deterministic)
