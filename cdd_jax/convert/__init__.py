"""Checkpoint conversion between cdd_jax and other frameworks' layouts."""

from cdd_jax.convert.diffusers import (
    canonical_json,
    load_diffusers,
    read_scheduler_config,
    save_diffusers,
)

__all__ = ["canonical_json", "load_diffusers", "read_scheduler_config", "save_diffusers"]
