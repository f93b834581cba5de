"""diffusers `UNet2DModel` (the pixel-space DDPM U-Net, e.g. google/ddpm-*) as a linen module."""

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

# diffusers 0.42 `UNet2DModel.__init__` defaults.
DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D",
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None,
)
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2D", None)
_SUPPORTED = dict(
    time_embedding_type=("positional",), downsample_type=("conv",), upsample_type=("conv",),
    resnet_time_scale_shift=("default",), class_embed_type=(None,), num_class_embeds=(None,),
    act_fn=("silu", "swish"),
)


def validate(cfg: dict) -> None:
    """ValueError naming whatever in a UNet2DModel config the port does not implement."""
    reject_unsupported(cfg, _SUPPORTED, "UNet2DModel")
    check_block_types("down", cfg["down_block_types"], DOWN_TYPES)
    check_block_types("up", cfg["up_block_types"], UP_TYPES)
    if cfg["mid_block_type"] not in MID_TYPES:
        raise ValueError(f"unsupported mid block type {cfg['mid_block_type']!r}; the cdd_jax "
                         f"port supports UNetMidBlock2D or None")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels must have "
                         "the same length")


class UNet2DModel(DiffusersModel):
    """`apply({'params': p}, sample, timesteps) -> prediction`, NHWC in and out.

    `timesteps`: scalar or [B], in the checkpoint's units (0..num_train_timesteps). Built from a
    diffusers config with `from_config`; `config_json` carries that config for export.
    """

    DEFAULTS = DEFAULTS
    validate = staticmethod(validate)

    def example_inputs(self, batch: int = 1, size: int | None = None) -> tuple:
        """(sample, timesteps) of the smallest valid spatial size (or `size`), for init."""
        cfg = self.config
        size = size or 2 ** (len(cfg["block_out_channels"]) - 1)
        return (jnp.zeros((batch, size, size, cfg["in_channels"]), jnp.float32),
                jnp.zeros((batch,), jnp.float32))

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states=None, *,
                 train: bool = False, skip_residuals=None, middle_residual=None,
                 input_residual=None) -> jax.Array:
        """The residuals (all optional) are where a control encoder's gated features join:
        `input_residual` is added after `conv_in`, `skip_residuals` to the skip features
        (shallowest first, as `encoder_features` returns them), `middle_residual` to the mid
        block's output."""
        if encoder_hidden_states is not None:
            raise ValueError("UNet2DModel takes no encoder_hidden_states")
        emb = time_features(self, sample, timesteps)
        skips, h = encoder_features(self, sample, emb, train=train,
                                    input_residual=input_residual)
        if skip_residuals is not None:
            skips = [s + r for s, r in zip(skips, skip_residuals, strict=True)]
        if middle_residual is not None:
            h = h + middle_residual
        return decoder_output(self, h, skips, emb, train=train)


# The three parts below build their submodules in the scope of the module whose compact method
# calls them: `UNet2DModel` itself, or a control encoder that duplicates the encoder half under
# its own name (`cdd_jax.models.control`), with the same parameter names as the teacher's.


def _common(cfg: dict, u: DiffusersModel) -> dict:
    return dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], dropout=cfg["dropout"],
                remat=u.remat, dtype=u.dtype)


def time_features(u: UNet2DModel, sample: jax.Array, timesteps) -> jax.Array:
    """Checks `sample`; `time_embedding` of the timesteps (checkpoint units) -> emb [B, D]."""
    cfg = u.config
    validate(cfg)
    activation(cfg["act_fn"])
    return unet_time_embedding(cfg, sample, timesteps, u.dtype)


def encoder_features(u: UNet2DModel, sample: jax.Array, emb: jax.Array, *, train: bool,
                     input_residual=None) -> tuple[list, jax.Array]:
    """`conv_in`, the down blocks and the mid block: (skip features shallowest first, h)."""
    cfg = u.config
    ch = cfg["block_out_channels"]
    n = len(ch)
    common = _common(cfg, u)
    x = sample.astype(u.dtype)
    if cfg["center_input_sample"]:
        x = 2 * x - 1.0
    h = constrain(conv(ch[0], name="conv_in", dtype=u.dtype)(x))
    if input_residual is not None:
        h = h + input_residual
    skips = [h]
    for i, btype in enumerate(cfg["down_block_types"]):
        attn = "self" if btype == "AttnDownBlock2D" else None
        h, res = DownBlock(attn=attn, dim_head=cfg["attention_head_dim"] or ch[i],
                           attn_groups=cfg["norm_num_groups"], out_channels=ch[i],
                           num_layers=cfg["layers_per_block"], add_downsample=i < n - 1,
                           downsample_padding=cfg["downsample_padding"], **common,
                           name=f"down_blocks_{i}")(h, emb, None, not train)
        skips.extend(res)
    if cfg["mid_block_type"] is not None:
        mid = dict(common, output_scale_factor=cfg["mid_block_scale_factor"])
        h = MidBlock(attn="self" if cfg["add_attention"] else None,
                     dim_head=cfg["attention_head_dim"] or ch[-1],
                     attn_groups=cfg["attn_norm_num_groups"] or cfg["norm_num_groups"],
                     **mid, name="mid_block")(h, emb, None, not train)
    return skips, h


def decoder_output(u: UNet2DModel, h: jax.Array, skips: list, emb: jax.Array, *,
                   train: bool) -> jax.Array:
    """The up blocks (consuming the skips deepest first), `conv_norm_out`, `conv_out`."""
    cfg = u.config
    ch = cfg["block_out_channels"]
    n = len(ch)
    common = _common(cfg, u)
    skips = list(skips)
    for i, btype in enumerate(cfg["up_block_types"]):
        out = ch[n - 1 - i]
        k = cfg["layers_per_block"] + 1
        res, skips = skips[-k:], skips[:-k]
        h = UpBlock(attn="self" if btype == "AttnUpBlock2D" else None,
                    dim_head=cfg["attention_head_dim"] or out,
                    attn_groups=cfg["norm_num_groups"], out_channels=out, num_layers=k,
                    add_upsample=i < n - 1, **common,
                    name=f"up_blocks_{i}")(h, res, emb, None, not train)
    h = group_norm(cfg["norm_num_groups"], cfg["norm_eps"], name="conv_norm_out",
                   dtype=u.dtype)(h)
    out = conv(cfg["out_channels"], name="conv_out", dtype=u.dtype)(nn.silu(h))
    return out.astype(jnp.float32)


def config_from_fields(*, ch: int, ch_mult, num_res_blocks: int, attn_resolutions,
                       num_groups: int, head_dim: int, dropout: float, image_size: int,
                       in_channels: int = 3, out_channels: int = 3) -> dict:
    """A UNet2DModel config from cdd_jax's `model` fields, for `image_size` px inputs.

    Level i runs at image_size / 2**i px; its blocks have attention when that size is in
    `attn_resolutions` (diffusers fixes the block types, so the architecture is tied to the
    training size, as in diffusers). Heads have `head_dim` channels, fewer where a level is
    narrower (then one head), as the cdd_jax U-Net does.
    """
    widths = [int(ch) * int(m) for m in ch_mult]
    levels = len(widths)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {image_size} is not divisible by 2**{levels - 1} "
                         f"(ch_mult={tuple(ch_mult)})")
    attn = [image_size // 2**i in tuple(attn_resolutions) for i in range(levels)]
    attn_widths = [w for w, a in zip(widths, attn, strict=True) if a] + [widths[-1]]  # + mid
    for w in widths:  # (then it divides the concatenated widths of the up blocks too)
        if w % num_groups:
            raise ValueError(f"model.num_groups={num_groups} does not divide a UNet2DModel "
                             f"layer width ({w} channels); choose a divisor of every level "
                             f"width {widths}")
    dim_head = min([int(head_dim)] + attn_widths)
    if any(w % dim_head for w in attn_widths):
        raise ValueError(f"attention widths {attn_widths} are not multiples of the head size "
                         f"{dim_head} (model.head_dim={head_dim})")
    return dict(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=widths, layers_per_block=int(num_res_blocks),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=dim_head, norm_num_groups=int(num_groups), dropout=float(dropout),
        add_attention=True, flip_sin_to_cos=True, freq_shift=0,
    )
