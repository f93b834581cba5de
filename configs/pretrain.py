"""Stage 1 alone: unconditional pretraining of the teacher U-Net.

    python -m cdd_jax.main --config=configs/pretrain.py --workdir=/tmp/pretrain
    python -m cdd_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/tiny
Variants: default (bundled photos, ~20 min on 2 CPU cores), tiny (tests), large (accelerators).
"""

from cdd_jax.config.presets import pretrain_config


def get_config(variant: str | None = None):
    return pretrain_config(variant or "default")
