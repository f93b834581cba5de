"""Linen ports of diffusers models, parameter for parameter (see `cdd_jax.convert.diffusers`).

`UNet2DModel` (pixel DDPM), `UNet2DConditionModel` (Stable Diffusion 1.x/2.x) and `AutoencoderKL`
(the SD VAE), each built from a diffusers `config.json` dict with `from_config`, NHWC.
"""

from __future__ import annotations

from cdd_jax.models.diffusers.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from cdd_jax.models.diffusers.unet_2d import UNet2DModel
from cdd_jax.models.diffusers.unet_2d_condition import UNet2DConditionModel

MODEL_CLASSES = {c.__name__: c for c in (UNet2DModel, UNet2DConditionModel, AutoencoderKL)}


def from_config(config: dict, **kw):
    """The port named by `config["_class_name"]`, built from that diffusers config."""
    name = config.get("_class_name")
    if name not in MODEL_CLASSES:
        raise ValueError(f"unsupported diffusers model class {name!r}; the cdd_jax ports are "
                         f"{', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[name].from_config(config, **kw)


__all__ = ["AutoencoderKL", "DiagonalGaussian", "MODEL_CLASSES", "UNet2DConditionModel",
           "UNet2DModel", "from_config"]
