"""A tiny Stable-Diffusion-style teacher made locally (no download): a two-level
UNet2DConditionModel (cross-attention in the mid block only: each transformer block costs ~1 min
of XLA:CPU compile time in a CoDi step here), a two-level
AutoencoderKL (latents at 1/2 of the image size) and a stored prompt embedding, with random
weights drawn with numpy (`cdd_jax.convert.diffusers.random_params`) so that no layer is
trivially zero."""

from __future__ import annotations

import numpy as np

from cdd_jax.convert.diffusers import random_params
from cdd_jax.convert.pipeline import scheduler_config
from cdd_jax.convert.sd import save_sd_pipeline
from cdd_jax.models.diffusers.autoencoder_kl import AutoencoderKL
from cdd_jax.models.diffusers.unet_2d_condition import UNet2DConditionModel

TOKENS, WIDTH = 3, 8
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16],
            down_block_types=["DownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "UpBlock2D"], layers_per_block=1,
            cross_attention_dim=WIDTH, attention_head_dim=2, norm_num_groups=4)
VAE = dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
           block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)


def tiny_unet(seed=0):
    module = UNet2DConditionModel.from_config({"_class_name": "UNet2DConditionModel", **UNET})
    return module, random_params(module, seed)


def tiny_vae(seed=10):
    module = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", **VAE})
    return module, random_params(module, seed, 0.05)


def make_sd_folder(out, prediction_type="epsilon", seed=0):
    """Writes the tiny teacher as an SD-style pipeline folder (scaled_linear schedule)."""
    unet, unet_params = tiny_unet(seed)
    vae, vae_params = tiny_vae(seed + 10)
    embeds = np.random.default_rng(seed + 20).normal(size=(1, TOKENS, WIDTH)).astype(np.float32)
    sched = scheduler_config("scaled_linear", 1000, prediction_type)
    save_sd_pipeline(out, unet, unet_params, vae, vae_params, scheduler=sched,
                     prompt_embeds=embeds)
    return out


# The block structure of SD 1.5's U-Net (4 levels, cross-attention in the first three and the
# mid block, 2 layers per block) and VAE (4 levels: latents at 1/8), at stand-in widths.
SD15_UNET = dict(UNET, block_out_channels=[16, 32, 32, 32],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2,
                 cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, sample_size=8)
SD15_VAE = dict(VAE, block_out_channels=[8, 16, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=64)


def make_sd15_standin(out, prediction_type="epsilon", tokens=4):
    """An SD-1.5-structured teacher folder at stand-in widths (for the accelerator recipe)."""
    unet = UNet2DConditionModel.from_config({"_class_name": "UNet2DConditionModel", **SD15_UNET})
    vae = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", **SD15_VAE})
    embeds = np.random.default_rng(5).normal(size=(1, tokens, 16)).astype(np.float32)
    save_sd_pipeline(out, unet, random_params(unet, 1), vae, random_params(vae, 2, 0.05),
                     scheduler=scheduler_config("scaled_linear", 1000, prediction_type),
                     prompt_embeds=embeds)
    return out
