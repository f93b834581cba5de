"""Latent space: the teacher's autoencoder (diffusers `AutoencoderKL` port) between images and
the diffusion model's latents. Its parameters are passed as `{"vae": vae_params}`; they stay out
of the train state (frozen, and ~100 fewer leaves in every EMA / optimiser update: the CoDi
step's XLA:CPU compile here took 3.7 min and 5.4 GB with them inside).

    latents = scaling_factor * E[q(z | x)]          (the posterior mean; diffusers pipelines scale
    images  = D(latents / scaling_factor)             the same way)

Images are NHWC in [-1, 1]; latents have `channels` channels and 1 / `factor` of the size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdd_jax.models.diffusers.autoencoder_kl import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """Encode / decode through `vae`, reading its parameters from `params["vae"]`."""

    vae: AutoencoderKL

    @property
    def factor(self) -> int:
        """Image size over latent size: 2 ** (number of the encoder's downsamplings)."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def channels(self) -> int:
        return int(self.vae.config["latent_channels"])

    def shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The latent shape of an NHWC image batch shape (H, W divisible by `factor`)."""
        b, h, w, _ = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's "
                             f"downsampling factor {self.factor}")
        return (b, h // self.factor, w // self.factor, self.channels)

    def encode(self, params: dict, images: jax.Array) -> jax.Array:
        posterior = self.vae.apply({"params": params["vae"]}, images, method="encode")
        return posterior.mode() * self.vae.scaling_factor

    def decode(self, params: dict, latents: jax.Array) -> jax.Array:
        z = jnp.asarray(latents, jnp.float32) / self.vae.scaling_factor
        return self.vae.apply({"params": params["vae"]}, z, method="decode")

    def encoder(self, vae_params: dict, keep_pixels: bool = False, encode_cond: bool = False):
        """A jitted batch -> batch replacing "image" by its latents (`Job.prepare_batch`); the
        VAE parameters are an argument (on the devices), not constants of the program.
        `keep_pixels`: also keep the clean image as "pixels" (a pixel-space d_x reads it);
        `encode_cond`: replace "cond" by its latents too (control.cond_space="latent")."""
        vae_params = jax.device_put(vae_params)
        encode = jax.jit(lambda p, x: self.encode({"vae": p}, x))

        def prepare(batch: dict) -> dict:
            out = {**batch, "image": encode(vae_params, batch["image"])}
            if encode_cond:
                out["cond"] = encode(vae_params, batch["cond"])
            if keep_pixels:
                out["pixels"] = batch["image"]
            return out

        return prepare
