"""The backbone U-Net of a job and the `model` config section that picks it.

Two families (`model.family`):

- "unet2d" (default): the port of diffusers' `UNet2DModel` (`cdd_jax.models.diffusers`), the
  layout of pixel-space DDPM checkpoints. Its architecture is `model.diffusers_config` (the
  checkpoint's `config.json`, filled in from the teacher checkpoint when that is a diffusers
  folder) or, when that is empty, derived from the fields below at the training crop size. The
  network's time input is in the checkpoint's units: t * `model.num_train_timesteps`.
- "unet2d_condition": the port of diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x):
  a latent-space U-Net with cross-attention to prompt embeddings (`context`, [B, T, D]). Its
  architecture is always `model.diffusers_config` (filled in from the teacher checkpoint).
- "cdd": the original cdd_jax U-Net (`cdd_jax.models.unet`), kept so that runs and checkpoints
  made with it still load and reproduce; its time input is t in [0, 1].

Both predict with the same parameterisation (v for the shipped teacher) and both take the
control encoder of `cdd_jax.models.control`: `encoder_features` builds the encoder half of
either family in the scope of the calling module, with the teacher's parameter names.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.models.diffusers.unet_2d import UNet2DModel, config_from_fields
from cdd_jax.models.diffusers.unet_2d import encoder_features as unet2d_encoder_features
from cdd_jax.models.diffusers.unet_2d import time_features as unet2d_time_features
from cdd_jax.models.diffusers.unet_2d_condition import UNet2DConditionModel
from cdd_jax.models.diffusers.unet_2d_condition import (
    encoder_features as cond_encoder_features,
)
from cdd_jax.models.diffusers.unet_2d_condition import time_features as cond_time_features
from cdd_jax.models.layers import TimeEmbedding
from cdd_jax.models.unet import Encoder, Middle, UNet, unet_kwargs

FAMILIES = ("unet2d", "unet2d_condition", "cdd")
_CLASS_OF_FAMILY = {"unet2d": "UNet2DModel", "unet2d_condition": "UNet2DConditionModel"}
Backbone = Any  # UNet | UNet2DModel | UNet2DConditionModel


def model_config() -> ml_collections.ConfigDict:
    """The `model` section: which U-Net, and its size (the CPU-scale teacher by default)."""
    c = ml_collections.ConfigDict()
    # "unet2d" (diffusers UNet2DModel port), "unet2d_condition" (UNet2DConditionModel port, the
    # latent text-to-image U-Net) or "cdd" (see module doc).
    c.family = "unet2d"
    # unet2d*: the checkpoint's config.json as JSON text; "" = derived from the fields below
    # ("unet2d" only; "unet2d_condition" takes it from the teacher checkpoint).
    c.diffusers_config = ""
    c.num_train_timesteps = 1000  # unet2d*: network time input = t * this (diffusers units).
    # unet2d_condition (latent, text-conditioned teachers; filled in / checked from the teacher):
    c.latent_factor = 1  # Image pixels per latent pixel (the VAE's downsampling); 1 = pixels.
    c.latent_channels = 0  # Latent channels the U-Net reads; 0 = whatever the teacher has.
    c.prompt_tokens = 0  # Tokens T of the stored prompt embedding [1, T, D] (from the teacher).
    c.prompt_embed_dim = 0  # D, the U-Net's cross_attention_dim; 0 = whatever the teacher has.
    c.ch = 32  # Base channel width.
    c.ch_mult = (1, 2, 2)  # Width multiplier per resolution stage (one downsample between stages).
    c.num_res_blocks = 1  # Residual blocks per stage in the encoder (decoder uses one more).
    c.attn_resolutions = (8,)  # Spatial sizes (pixels) at which self-attention is applied.
    c.dropout = 0.0  # Dropout rate inside residual blocks (training only).
    c.num_groups = 8  # GroupNorm groups ("cdd": reduced automatically for narrow layers).
    c.head_dim = 32  # Channels per attention head.
    c.dtype = "float32"  # Compute dtype ("float32" or "bfloat16"); parameters stay float32.
    c.remat = False  # Rematerialise residual blocks in the backward pass (saves memory).
    return c


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError/TypeError naming the first bad `model` field."""
    checks.check_keys(cfg, model_config(), "model.")
    checks.choice(cfg, "family", FAMILIES, prefix="model.")
    if not isinstance(cfg.diffusers_config, str):
        raise TypeError("model.diffusers_config must be JSON text (str), got "
                        f"{type(cfg.diffusers_config).__name__}")
    if cfg.diffusers_config:
        _parse_diffusers_config(cfg.diffusers_config, cfg.family)
    checks.number(cfg, "num_train_timesteps", 1, integer=True, prefix="model.")
    for key in ("latent_channels", "prompt_tokens", "prompt_embed_dim"):
        checks.number(cfg, key, 0, integer=True, prefix="model.")
    checks.number(cfg, "latent_factor", 1, integer=True, prefix="model.")
    if cfg.latent_factor & (cfg.latent_factor - 1):
        raise ValueError(f"model.latent_factor must be a power of 2, got {cfg.latent_factor}")
    if cfg.family != "unet2d_condition" and (cfg.latent_factor != 1 or cfg.prompt_tokens):
        raise ValueError("model.latent_factor / model.prompt_tokens are for "
                         "model.family='unet2d_condition' only")
    for key in ("ch", "num_res_blocks", "num_groups", "head_dim"):
        checks.number(cfg, key, 1, integer=True, prefix="model.")
    checks.positive_ints(cfg, "ch_mult", prefix="model.")
    if tuple(cfg.attn_resolutions):
        checks.positive_ints(cfg, "attn_resolutions", prefix="model.")
    checks.number(cfg, "dropout", 0, 1, hi_open=True, prefix="model.")
    checks.choice(cfg, "dtype", ("float32", "bfloat16"), prefix="model.")
    checks.boolean(cfg, "remat", prefix="model.")


def _parse_diffusers_config(text: str, family: str = "unet2d") -> dict:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"model.diffusers_config is not valid JSON: {e}") from e
    want = _CLASS_OF_FAMILY.get(family, "UNet2DModel")
    if not isinstance(cfg, dict) or cfg.get("_class_name", want) != want:
        got = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"model.diffusers_config must be a {want} config for "
                         f"model.family={family!r}, got {got!r}")
    return cfg


def unet2d_config(cfg: ml_collections.ConfigDict, image_size: int) -> dict:
    """The diffusers config of a "unet2d" / "unet2d_condition" `model` section at `image_size`
    px (the training crop; "unet2d_condition" needs `model.diffusers_config`)."""
    if cfg.diffusers_config:
        return _parse_diffusers_config(cfg.diffusers_config, cfg.family)
    if cfg.family == "unet2d_condition":
        raise ValueError("model.family='unet2d_condition' needs model.diffusers_config (set "
                         "teacher.checkpoint to a Stable-Diffusion-style pipeline folder)")
    return config_from_fields(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                              attn_resolutions=cfg.attn_resolutions, num_groups=cfg.num_groups,
                              head_dim=cfg.head_dim, dropout=cfg.dropout, image_size=image_size)


def backbone_from_config(cfg: ml_collections.ConfigDict, image_size: int) -> Backbone:
    """The U-Net of a `model` section; `image_size`: the training crop size (data.crop_size)."""
    validate_model_config(cfg)
    if cfg.family == "cdd":
        return UNet(**unet_kwargs(cfg))
    if cfg.family == "unet2d_condition":
        return UNet2DConditionModel.from_config(unet2d_config(cfg, image_size),
                                                dtype=jnp.dtype(cfg.dtype), remat=bool(cfg.remat))
    return UNet2DModel.from_config(unet2d_config(cfg, image_size), dtype=jnp.dtype(cfg.dtype),
                                   remat=bool(cfg.remat))


def timestep_scale(cfg: ml_collections.ConfigDict) -> float:
    """Network time input per unit of t in [0, 1] (the "cdd" U-Net scales inside)."""
    return 1.0 if cfg.family == "cdd" else float(cfg.num_train_timesteps)


def base_width(backbone: Backbone) -> int:
    """Channels after the input conv (what the condition embedder must produce)."""
    if isinstance(backbone, UNet):
        return backbone.ch
    return backbone.config["block_out_channels"][0]


def encoder_features(backbone: Backbone, x: jax.Array, t: jax.Array, *, train: bool,
                     input_residual=None, context=None) -> tuple[list, jax.Array]:
    """The encoder half of `backbone` (time embedding, input conv, down path, middle), built in
    the scope of the calling module with the backbone's own parameter names: (skips, h).

    `t`: the backbone's own time input (already scaled by `timestep_scale`); `context`: the
    prompt embeddings [B, T, D] of a "unet2d_condition" backbone (None for the others).
    """
    if isinstance(backbone, UNet2DConditionModel):
        emb, ctx = cond_time_features(backbone, x, t, context)
        return cond_encoder_features(backbone, x, emb, ctx, train=train,
                                     input_residual=input_residual)
    if isinstance(backbone, UNet):
        emb = TimeEmbedding(backbone.ch, backbone.dtype, name="time_embed")(t)
        skips = Encoder(**backbone.encoder_kwargs(), name="encoder")(
            x.astype(backbone.dtype), emb, train, input_residual)
        return skips, Middle(**backbone.middle_kwargs(), name="middle")(skips[-1], emb, train)
    emb = unet2d_time_features(backbone, x, t)
    return unet2d_encoder_features(backbone, x, emb, train=train, input_residual=input_residual)



def model_section_for(backbone: Backbone) -> ml_collections.ConfigDict:
    """The cdd_jax `model` section that rebuilds `backbone` (e.g. a module `load_diffusers`
    returned): family "unet2d" with its config.json as `diffusers_config`, or the "cdd" fields."""
    c = model_config()
    if isinstance(backbone, UNet):
        c.family = "cdd"
        c.update(ch=backbone.ch, ch_mult=tuple(backbone.ch_mult),
                 num_res_blocks=backbone.num_res_blocks,
                 attn_resolutions=tuple(backbone.attn_resolutions), dropout=backbone.dropout,
                 num_groups=backbone.num_groups, head_dim=backbone.head_dim)
    else:
        name = backbone.config.get("_class_name")
        families = {v: k for k, v in _CLASS_OF_FAMILY.items()}
        if name not in families:
            raise ValueError(f"a {name} is not a backbone (a UNet2DModel or a "
                             "UNet2DConditionModel is)")
        c.family = families[name]
        c.diffusers_config = backbone.config_json
        c.dropout = float(backbone.config["dropout"])
    c.dtype = jnp.dtype(backbone.dtype).name
    c.remat = bool(backbone.remat)
    return c
