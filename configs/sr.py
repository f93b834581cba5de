"""The main job: 4x real-world super-resolution by CoDi distillation of the shipped teacher.

    python -m cdd_jax.main --config=configs/sr.py --workdir=/tmp/sr
Writes <workdir>/eval/results.{json,md} (the 32 px held-out crops) and, per split of
`evaluate.photos.splits` (default the bundled validation and test photos, 128 px centre crops,
through the Upscaler's tiled path), eval/photos_<split>.{json,md} and photos_<split>_per_image.csv.
Variants: default (bundled photos, shipped teacher, ~20 min on 2 CPU cores), tiny (tests),
large (accelerators: TFDS data, 256 px, bf16, FSDP); sd (a Stable Diffusion 1.5 / 2.1 teacher
at 512 px: latent, text-conditioned CoDi, bf16, FSDP, remat) and sd_tiny (its CPU test size, on a
locally made SD-style folder given as --config.teacher.checkpoint).
"""

from cdd_jax.config.presets import sd_config, sr_config


def get_config(variant: str | None = None):
    if variant in ("sd", "sd_tiny"):
        return sd_config("large" if variant == "sd" else "tiny")
    return sr_config(variant or "default")
