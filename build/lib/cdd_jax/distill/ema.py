"""Exponential moving averages of parameters: the CoDi target theta_minus and the eval weights.

Two EMAs with their own decay and warm-up: the target EMA must track the online network closely
(a stale target mostly ignores the new condition path), while the evaluation EMA averages longer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

WARMUPS = ("none", "consistency", "power")


def ema_decay(
    step: Any,
    decay: float,
    warmup: str = "none",
    *,
    power: float = 2.0 / 3.0,
    inv_gamma: float = 1.0,
) -> jax.Array:
    """Decay mu to use at optimiser step `step` (0-based count of completed updates).

    warmup "none": mu; "consistency": min(mu, (1 + n) / (10 + n));
    "power": min(mu, 1 - (1 + n / inv_gamma) ** -power), 0 at n = 0 (the EMA starts as a copy).
    """
    if warmup not in WARMUPS:
        raise ValueError(f"ema warmup must be one of {WARMUPS}, got {warmup!r}")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
    mu = jnp.asarray(decay, jnp.float32)
    n = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
    if warmup == "consistency":
        return jnp.minimum(mu, (1.0 + n) / (10.0 + n))
    if warmup == "power":
        return jnp.minimum(mu, 1.0 - (1.0 + n / inv_gamma) ** (-power))
    return mu


def ema_update(ema_params: Any, params: Any, decay: Any) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf, keeping each EMA leaf's dtype.

    The blend is computed in float32 (or wider) and cast back, so bfloat16 EMAs do not lose the
    small increments to rounding of `decay` itself. Non-float leaves take the new value.
    """
    decay = jnp.asarray(decay, jnp.float32)

    def update(ema, new):
        ema = jnp.asarray(ema)
        if not jnp.issubdtype(ema.dtype, jnp.floating):
            return jnp.asarray(new, ema.dtype)
        wide = jnp.promote_types(ema.dtype, jnp.float32)
        out = decay.astype(wide) * ema.astype(wide) + (1 - decay).astype(wide) * jnp.asarray(
            new
        ).astype(wide)
        return out.astype(ema.dtype)

    return jax.tree.map(update, ema_params, params)
