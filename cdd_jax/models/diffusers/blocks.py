"""The down, mid and up blocks of the diffusers ports and the checks of a diffusers config (block
types, per-level values, unsupported options)."""

from __future__ import annotations

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdd_jax.models.diffusers.attention import Attention, Transformer2DModel
from cdd_jax.models.diffusers.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
)


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


class DiffusersModel(nn.Module):
    """A port built from a diffusers `config.json` and carrying it (`config_json`, canonical JSON
    with diffusers' defaults filled in) so it can be exported again. Subclasses set `DEFAULTS`
    (diffusers' `__init__` defaults) and `validate` (rejects what the port does not support)."""

    config_json: str
    dtype: Dtype = jnp.float32
    remat: bool = False

    @classmethod
    def from_config(cls, config: dict, *, dtype: Dtype = jnp.float32, remat: bool = False):
        canon = canonical_config(cls.__name__, cls.DEFAULTS, config)
        cls.validate(json.loads(canon))
        return cls(canon, dtype, remat)

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

