"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) as a linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdd_jax.models.diffusers.blocks import (
    DiffusersModel,
    DownBlock,
    MidBlock,
    UpBlock,
    check_block_types,
    per_level,
    reject_unsupported,
)
from cdd_jax.models.diffusers.layers import (
    activation,
    conv,
    group_norm,
    unet_time_embedding,
)
from cdd_jax.models.layers import constrain

Dtype = Any

# diffusers 0.42 `UNet2DConditionModel.__init__` defaults.
DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
    addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None, addition_embed_type_num_heads=64,
)
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
_SUPPORTED = dict(
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), dual_cross_attention=(False,),
    class_embed_type=(None,), addition_embed_type=(None,), addition_time_embed_dim=(None,),
    num_class_embeds=(None,), resnet_time_scale_shift=("default",),
    resnet_skip_time_act=(False,), resnet_out_scale_factor=(1.0,),
    time_embedding_type=("positional",), time_embedding_act_fn=(None,),
    timestep_post_act=(None,), time_cond_proj_dim=(None,),
    projection_class_embeddings_input_dim=(None,), attention_type=("default",),
    class_embeddings_concat=(False,), mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,), reverse_transformer_layers_per_block=(None,),
    act_fn=("silu", "swish"),
    # diffusers itself rejects num_attention_heads here: attention_head_dim holds the head count.
    num_attention_heads=(None,),
)


def validate(cfg: dict) -> None:
    """ValueError naming whatever in a UNet2DConditionModel config the port does not implement."""
    reject_unsupported(cfg, _SUPPORTED, "UNet2DConditionModel")
    check_block_types("down", cfg["down_block_types"], DOWN_TYPES)
    check_block_types("up", cfg["up_block_types"], UP_TYPES)
    if cfg["mid_block_type"] not in MID_TYPES:
        raise ValueError(f"unsupported mid block type {cfg['mid_block_type']!r}; the cdd_jax "
                         "port supports UNetMidBlock2DCrossAttn or None")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels must have "
                         "the same length")
    if any(per_level(cfg["only_cross_attention"], n, "only_cross_attention")):
        raise ValueError("only_cross_attention=True is not supported by the cdd_jax port")
    if not isinstance(cfg["cross_attention_dim"], int):
        raise ValueError("per-level cross_attention_dim is not supported by the cdd_jax port "
                         f"(got {cfg['cross_attention_dim']!r})")
    if cfg["norm_num_groups"] is None:
        raise ValueError("norm_num_groups=None is not supported by the cdd_jax port")
    layers = per_level(cfg["transformer_layers_per_block"], n, "transformer_layers_per_block")
    if not all(isinstance(v, int) for v in layers):
        raise ValueError("nested transformer_layers_per_block is not supported by the port")


class UNet2DConditionModel(DiffusersModel):
    """`apply({'params': p}, sample, timesteps, encoder_hidden_states) -> prediction`, NHWC.

    `timesteps`: scalar or [B] in checkpoint units; `encoder_hidden_states`: [B, T,
    cross_attention_dim] (e.g. CLIP text features). `config_json` carries the diffusers config.
    """

    DEFAULTS = DEFAULTS
    validate = staticmethod(validate)

    def example_inputs(self, batch: int = 1, size: int | None = None, tokens: int = 1) -> tuple:
        """(sample, timesteps, encoder_hidden_states) of the smallest valid size, for init."""
        cfg = self.config
        size = size or 2 ** (len(cfg["block_out_channels"]) - 1)
        return (jnp.zeros((batch, size, size, cfg["in_channels"]), jnp.float32),
                jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, tokens, cfg["cross_attention_dim"]), jnp.float32))

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array | None = None,
                 *, train: bool = False, skip_residuals=None, middle_residual=None,
                 input_residual=None) -> jax.Array:
        """The residuals (all optional) are where a control encoder's gated features join, as in
        `UNet2DModel`: `input_residual` after `conv_in`, `skip_residuals` on the skip features
        (shallowest first), `middle_residual` on the mid block's output."""
        emb, context = time_features(self, sample, timesteps, encoder_hidden_states)
        skips, h = encoder_features(self, sample, emb, context, train=train,
                                    input_residual=input_residual)
        if skip_residuals is not None:
            skips = [s + r for s, r in zip(skips, skip_residuals, strict=True)]
        if middle_residual is not None:
            h = h + middle_residual
        return decoder_output(self, h, skips, emb, context, train=train)


# The three parts below build their submodules in the scope of the module whose compact method
# calls them: `UNet2DConditionModel` itself, or a control encoder that duplicates the encoder half
# under its own name (`cdd_jax.models.control`), with the same parameter names as the teacher's.


def _levels(cfg: dict) -> tuple[list, list, list]:
    n = len(cfg["block_out_channels"])
    return (per_level(cfg["attention_head_dim"], n, "attention_head_dim"),  # head counts
            per_level(cfg["layers_per_block"], n, "layers_per_block"),
            per_level(cfg["transformer_layers_per_block"], n, "transformer_layers_per_block"))


def _common(cfg: dict, u: DiffusersModel) -> dict:
    return dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], dropout=cfg["dropout"],
                use_linear_projection=cfg["use_linear_projection"],
                upcast=cfg["upcast_attention"], remat=u.remat, dtype=u.dtype)


def time_features(u: UNet2DConditionModel, sample: jax.Array, timesteps,
                  encoder_hidden_states: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Checks the inputs; (`time_embedding` of the timesteps [B, D], the context in the compute
    dtype [B, T, cross_attention_dim])."""
    cfg = u.config
    validate(cfg)
    activation(cfg["act_fn"])
    width = cfg["cross_attention_dim"]
    if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or (
            encoder_hidden_states.shape[-1] != width):
        got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
        raise ValueError(f"UNet2DConditionModel needs encoder_hidden_states [B, T, {width}], "
                         f"got {got}")
    emb = unet_time_embedding(cfg, sample, timesteps, u.dtype)
    return emb, encoder_hidden_states.astype(u.dtype)


def encoder_features(u: UNet2DConditionModel, sample: jax.Array, emb: jax.Array,
                     context: jax.Array, *, train: bool,
                     input_residual=None) -> tuple[list, jax.Array]:
    """`conv_in`, the down blocks and the mid block: (skip features shallowest first, h)."""
    cfg = u.config
    ch = cfg["block_out_channels"]
    n = len(ch)
    heads, layers, t_layers = _levels(cfg)
    common = _common(cfg, u)
    x = sample.astype(u.dtype)
    if cfg["center_input_sample"]:
        x = 2 * x - 1.0
    h = constrain(conv(ch[0], cfg["conv_in_kernel"], name="conv_in", dtype=u.dtype)(x))
    if input_residual is not None:
        h = h + input_residual
    skips = [h]
    for i, btype in enumerate(cfg["down_block_types"]):
        h, res = DownBlock(attn="cross" if btype == "CrossAttnDownBlock2D" else None,
                           heads=heads[i], transformer_layers=t_layers[i], out_channels=ch[i],
                           num_layers=layers[i], add_downsample=i < n - 1,
                           downsample_padding=cfg["downsample_padding"], **common,
                           name=f"down_blocks_{i}")(h, emb, context, not train)
        skips.extend(res)
    if cfg["mid_block_type"] is not None:
        h = MidBlock(attn="cross", heads=heads[-1], transformer_layers=t_layers[-1],
                     output_scale_factor=cfg["mid_block_scale_factor"], **common,
                     name="mid_block")(h, emb, context, not train)
    return skips, h


def decoder_output(u: UNet2DConditionModel, h: jax.Array, skips: list, emb: jax.Array,
                   context: jax.Array, *, train: bool) -> jax.Array:
    """The up blocks (consuming the skips deepest first), `conv_norm_out`, `conv_out`."""
    cfg = u.config
    ch = cfg["block_out_channels"]
    n = len(ch)
    heads, layers, t_layers = _levels(cfg)
    common = _common(cfg, u)
    skips = list(skips)
    for i, btype in enumerate(cfg["up_block_types"]):
        lvl = n - 1 - i
        k = layers[lvl] + 1
        res, skips = skips[-k:], skips[:-k]
        h = UpBlock(attn="cross" if btype == "CrossAttnUpBlock2D" else None,
                    heads=heads[lvl], transformer_layers=t_layers[lvl], out_channels=ch[lvl],
                    num_layers=k, add_upsample=i < n - 1, **common,
                    name=f"up_blocks_{i}")(h, res, emb, context, not train)
    h = group_norm(cfg["norm_num_groups"], cfg["norm_eps"], name="conv_norm_out",
                   dtype=u.dtype)(h)
    out = conv(cfg["out_channels"], cfg["conv_out_kernel"], name="conv_out",
               dtype=u.dtype)(nn.silu(h))
    return out.astype(jnp.float32)
