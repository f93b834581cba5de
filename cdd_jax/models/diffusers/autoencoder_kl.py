"""diffusers `AutoencoderKL` (the Stable Diffusion VAE) as a linen module, NHWC."""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cdd_jax.models.diffusers.blocks import (
    DiffusersModel,
    DownBlock,
    MidBlock,
    UpBlock,
    check_block_types,
    reject_unsupported,
)
from cdd_jax.models.diffusers.layers import (
    activation,
    conv,
    group_norm,
)

Dtype = Any

# diffusers 0.42 `AutoencoderKL.__init__` defaults.
DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D"], block_out_channels=[64], layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
_SUPPORTED = dict(act_fn=("silu", "swish"))
_EPS = 1e-6  # diffusers' VAE uses eps 1e-6 in every GroupNorm


def validate(cfg: dict) -> None:
    reject_unsupported(cfg, _SUPPORTED, "AutoencoderKL")
    check_block_types("down", cfg["down_block_types"], ("DownEncoderBlock2D",))
    check_block_types("up", cfg["up_block_types"], ("UpDecoderBlock2D",))
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels must have "
                         "the same length")


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) per latent element (NHWC)."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def _blocks_kwargs(cfg: dict, remat: bool, dtype) -> dict:
    return dict(groups=cfg["norm_num_groups"], eps=_EPS, remat=remat, dtype=dtype)


class Encoder(nn.Module):
    """conv_in, DownEncoderBlock2D levels, mid block, norm-SiLU-conv_out to 2*latent channels."""

    config_json: str
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = json.loads(self.config_json)
        ch, n, kw = cfg["block_out_channels"], len(cfg["block_out_channels"]), _blocks_kwargs(
            cfg, self.remat, self.dtype)
        h = conv(ch[0], name="conv_in", dtype=self.dtype)(x)
        for i in range(n):
            h, _ = DownBlock(out_channels=ch[i], num_layers=cfg["layers_per_block"],
                             add_downsample=i < n - 1, downsample_padding=0, **kw,
                             name=f"down_blocks_{i}")(h, None)
        h = MidBlock(attn="self" if cfg["mid_block_add_attention"] else None,
                     attn_groups=cfg["norm_num_groups"], **kw, name="mid_block")(h, None)
        h = nn.silu(group_norm(cfg["norm_num_groups"], _EPS, name="conv_norm_out",
                               dtype=self.dtype)(h))
        return conv(2 * cfg["latent_channels"], name="conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
    """conv_in, mid block, UpDecoderBlock2D levels (deepest first), norm-SiLU-conv_out."""

    config_json: str
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = json.loads(self.config_json)
        ch, n, kw = cfg["block_out_channels"], len(cfg["block_out_channels"]), _blocks_kwargs(
            cfg, self.remat, self.dtype)
        h = conv(ch[-1], name="conv_in", dtype=self.dtype)(z)
        h = MidBlock(attn="self" if cfg["mid_block_add_attention"] else None,
                     attn_groups=cfg["norm_num_groups"], **kw, name="mid_block")(h, None)
        for i in range(n):
            h = UpBlock(out_channels=ch[n - 1 - i], num_layers=cfg["layers_per_block"] + 1,
                        add_upsample=i < n - 1, **kw, name=f"up_blocks_{i}")(h, None, None)
        h = nn.silu(group_norm(cfg["norm_num_groups"], _EPS, name="conv_norm_out",
                               dtype=self.dtype)(h))
        return conv(cfg["out_channels"], name="conv_out", dtype=self.dtype)(h)


class AutoencoderKL(DiffusersModel):
    """`apply(v, x, method="encode") -> DiagonalGaussian`; `apply(v, z, method="decode") -> x`.

    Images and latents are NHWC; latents here are unscaled (multiply by `scaling_factor` for the
    diffusion model's units, as diffusers pipelines do). `__call__` encodes then decodes.
    """

    DEFAULTS = DEFAULTS
    validate = staticmethod(validate)

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    def example_inputs(self, batch: int = 1, size: int | None = None) -> tuple:
        cfg = self.config
        size = size or 2 ** (len(cfg["block_out_channels"]) - 1)
        return (jnp.zeros((batch, size, size, cfg["in_channels"]), jnp.float32),)

    def setup(self):
        cfg = self.config
        validate(cfg)
        activation(cfg["act_fn"])
        self.encoder = Encoder(self.config_json, self.dtype, self.remat)
        self.decoder = Decoder(self.config_json, self.dtype, self.remat)
        latent = cfg["latent_channels"]
        if cfg["use_quant_conv"]:
            self.quant_conv = conv(2 * latent, 1, dtype=self.dtype, name=None)
        if cfg["use_post_quant_conv"]:
            self.post_quant_conv = conv(latent, 1, dtype=self.dtype, name=None)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(x.astype(self.dtype))
        if self.config["use_quant_conv"]:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.config["use_post_quant_conv"]:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(posterior sample if `rng` is given, else posterior mean)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if rng is None else posterior.sample(rng))
