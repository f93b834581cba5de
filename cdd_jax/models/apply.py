"""The networks as `apply_fn(params, z_t, t, cond, rng) -> v_hat`, the one signature every
objective and sampler in `cdd_jax.distill` calls.

`rng` None means evaluation (no dropout); an rng turns on training mode with dropout drawn from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cdd_jax.models.backbone import Backbone
from cdd_jax.models.control import ConditionalUNet

ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]


def _mode(rng) -> dict:
    return dict(train=rng is not None, rngs={"dropout": rng} if rng is not None else {})


def unet_apply_fn(model: Backbone, timestep_scale: float = 1.0) -> ApplyFn:
    """The unconditional U-Net; `cond` is ignored. Its time input is t * `timestep_scale`
    (`cdd_jax.models.backbone.timestep_scale`)."""

    def apply_fn(params, z, t, cond, rng):
        del cond
        t_net = t if timestep_scale == 1.0 else jnp.asarray(t, jnp.float32) * timestep_scale
        return model.apply({"params": params}, z, t_net, **_mode(rng))

    return apply_fn


def conditional_apply_fn(model: ConditionalUNet) -> ApplyFn:
    """The conditional network (U-Net + control encoder). `cond` is the condition image, or a
    mapping {"image": condition image, "prompt_embeds": [B, T, D]} whose per-example prompt
    embeddings replace the network's stored one (`cdd_jax.distill.codi.unpack_batch` makes it
    from a batch with a "prompt_embeds" entry)."""

    def apply_fn(params, z, t, cond, rng):
        embeds = None
        if isinstance(cond, Mapping):
            cond, embeds = cond["image"], cond.get("prompt_embeds")
        return model.apply({"params": params}, z, t, cond, prompt_embeds=embeds, **_mode(rng))

    return apply_fn
