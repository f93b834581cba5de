"""The main job: 4x real-world super-resolution by CoDi distillation of the shipped teacher.

    python -m cdd_jax.main --config=configs/sr.py --workdir=/tmp/sr
Variants: default (bundled photos, shipped teacher, ~20 min on 2 CPU cores), tiny (tests),
large (accelerators: TFDS data, 256 px, bf16, FSDP).
"""

from cdd_jax.config.presets import sr_config


def get_config(variant: str | None = None):
    return sr_config(variant or "default")
