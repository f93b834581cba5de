"""A pure-functional linen U-Net (NHWC) that predicts v, split into separable parts.

The parts are separate modules so that the control encoder (`control.py`) can duplicate the
encoder path exactly:

    time_embed: t -> emb
    encoder:    (z, emb) -> skips (one per resolution stage, input conv first)
    middle:     (h, emb) -> h
    decoder:    (h, skips, emb) -> h          -> out_norm -> SiLU -> out_conv -> v_hat

`UNet.__call__` accepts optional residuals for the skips and the middle output: that is where a
conditional encoder's gated features join the main path (paper eq. 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.models.layers import (
    AttnBlock,
    Conv,
    Downsample,
    GroupNorm,
    ResBlock,
    TimeEmbedding,
    Upsample,
    constrain,
)

Dtype = Any


def _resblock_cls(remat: bool):
    return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock


class _Levels(nn.Module):
    """The fields shared by the down and the up path."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float = 0.0
    num_groups: int = 8
    head_dim: int = 32
    dtype: Dtype = jnp.float32
    remat: bool = False


class Encoder(_Levels):
    """Input conv and the down path. Returns the skip features, shallowest first."""

    @nn.compact
    def __call__(self, x, emb, train: bool, input_residual=None):
        block = _resblock_cls(self.remat)
        h = Conv(self.ch, dtype=self.dtype, name="conv_in")(x)
        if input_residual is not None:
            h = h + input_residual
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = block(self.ch * mult, self.dropout, self.num_groups, self.dtype,
                          name=f"down_{level}_res_{i}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.head_dim, self.num_groups, self.dtype,
                                  name=f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{level}_downsample")(h)
                skips.append(h)
        return skips


class Middle(nn.Module):
    """ResBlock - self-attention - ResBlock at the lowest resolution."""

    num_groups: int = 8
    head_dim: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h, emb, train: bool):
        block = _resblock_cls(self.remat)
        c = h.shape[-1]
        h = block(c, self.dropout, self.num_groups, self.dtype, name="res_0")(h, emb, train)
        h = AttnBlock(self.head_dim, self.num_groups, self.dtype, name="attn")(h)
        return block(c, self.dropout, self.num_groups, self.dtype, name="res_1")(h, emb, train)


class Decoder(_Levels):
    """The up path: consumes the encoder's skips deepest first."""

    @nn.compact
    def __call__(self, h, skips, emb, train: bool):
        block = _resblock_cls(self.remat)
        skips = list(skips)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(self.ch * self.ch_mult[level], self.dropout, self.num_groups,
                          self.dtype, name=f"up_{level}_res_{i}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.head_dim, self.num_groups, self.dtype,
                                  name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.dtype, name=f"up_{level}_upsample")(h)
        assert not skips, "decoder must consume every skip"
        return h


class UNet(nn.Module):
    """v-prediction U-Net: `apply({'params': p}, z_t, t, train=False) -> v_hat`."""

    ch: int = 32
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = (8,)
    dropout: float = 0.0
    num_groups: int = 8
    head_dim: int = 32
    dtype: Dtype = jnp.float32
    remat: bool = False
    out_ch: int = 3

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> UNet:
        return cls(**unet_kwargs(cfg))

    def encoder_kwargs(self) -> dict:
        return dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                    num_groups=self.num_groups, head_dim=self.head_dim, dtype=self.dtype,
                    remat=self.remat)

    def middle_kwargs(self) -> dict:
        return dict(num_groups=self.num_groups, head_dim=self.head_dim, dropout=self.dropout,
                    dtype=self.dtype, remat=self.remat)

    @nn.compact
    def __call__(self, z_t, t, train: bool = False, *, skip_residuals=None, middle_residual=None,
                 input_residual=None):
        if z_t.ndim != 4:
            raise ValueError(f"UNet expects NHWC input, got shape {z_t.shape}")
        depth = 2 ** (len(self.ch_mult) - 1)
        if z_t.shape[1] % depth or z_t.shape[2] % depth:
            raise ValueError(
                f"input size {z_t.shape[1:3]} must be divisible by {depth} "
                f"(2 ** (len(ch_mult) - 1) for ch_mult={tuple(self.ch_mult)})"
            )
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        x = constrain(z_t.astype(self.dtype))
        emb = TimeEmbedding(self.ch, self.dtype, name="time_embed")(t)
        skips = Encoder(**self.encoder_kwargs(), name="encoder")(x, emb, train, input_residual)
        h = Middle(**self.middle_kwargs(), name="middle")(skips[-1], emb, train)
        if skip_residuals is not None:
            skips = [s + r for s, r in zip(skips, skip_residuals, strict=True)]
        if middle_residual is not None:
            h = h + middle_residual
        h = Decoder(**self.encoder_kwargs(), name="decoder")(h, skips, emb, train)
        h = nn.silu(GroupNorm(self.num_groups, self.dtype, name="out_norm")(h))
        out = Conv(self.out_ch, zero_init=True, dtype=self.dtype, name="out_conv")(h)
        return out.astype(jnp.float32)


def unet_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    """Keyword arguments for `UNet` from a `model` section (`cdd_jax.models.backbone`)."""
    return dict(
        ch=int(cfg.ch),
        ch_mult=tuple(int(m) for m in cfg.ch_mult),
        num_res_blocks=int(cfg.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in cfg.attn_resolutions),
        dropout=float(cfg.dropout),
        num_groups=int(cfg.num_groups),
        head_dim=int(cfg.head_dim),
        dtype=jnp.dtype(cfg.dtype),
        remat=bool(cfg.remat),
    )


def init_params(model: nn.Module, rng: jax.Array, image_size: int, batch: int = 1, **kw):
    """Boxed (logically-partitioned) parameters for `model` at the given image size."""
    z = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    init = jax.jit(lambda r: model.init({"params": r}, z, t, train=False, **kw)["params"])
    return init(rng)
