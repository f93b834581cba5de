"""Attention for the diffusers ports: multi-head self/cross attention, GEGLU feed-forward, the
transformer block and `Transformer2DModel` (linear or 1x1-conv projections), named as diffusers
names them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdd_jax.models.diffusers.layers import Dtype, conv, dense, group_norm, layer_norm
from cdd_jax.models.layers import constrain


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
