"""The plain v-prediction diffusion loss: teacher pretraining and the `finetune` baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cdd_jax.diffusion import Schedule, add_noise, v_from_x_eps
from cdd_jax.distill.codi import ApplyFn, unpack_batch
from cdd_jax.distill.config import DIFFUSION_WEIGHTINGS


def v_space_weight(kind: str, logsnr: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Weight on the v-MSE that equals the named weighting in its own space.

    |v - v_hat|^2 = (SNR + 1) |x - x_hat|^2 = (SNR + 1) / SNR |eps - eps_hat|^2, so
    "none" 1 (plain v-MSE); "min_snr" (eps-space min(SNR, gamma) / SNR) -> min(SNR, gamma) /
    (SNR + 1); "truncated_snr" (x-space max(SNR, 1)) -> max(SNR, 1) / (SNR + 1); "snr_plus_one"
    (x-space SNR + 1) -> 1. Written with sigmoids so that SNR = 0 or inf stays finite.
    """
    if kind not in DIFFUSION_WEIGHTINGS:
        raise ValueError(f"unknown diffusion weighting {kind!r}; valid: {DIFFUSION_WEIGHTINGS}")
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if kind in ("none", "snr_plus_one"):
        return jnp.ones_like(logsnr)
    snr_frac = jax.nn.sigmoid(logsnr)  # SNR / (SNR + 1)
    inv_frac = jax.nn.sigmoid(-logsnr)  # 1 / (SNR + 1)
    if kind == "min_snr":
        return jnp.minimum(snr_frac, gamma * inv_frac)
    return jnp.maximum(snr_frac, inv_frac)


def diffusion_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    weighting: str = "none",
    snr_gamma: float = 5.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """E_{t ~ U(0,1), eps} w(t) mean((v_hat_theta(z_t, t, c) - v)^2), v = alpha_t eps - sigma_t x.

    t is drawn per example. `rng` is split as (t, eps, dropout). Returns (loss, metrics).
    """
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t = jax.random.uniform(rng_t, (x.shape[0],), jnp.float32)
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = add_noise(x, eps, alpha_t, sigma_t)
    v = v_from_x_eps(x, eps, alpha_t, sigma_t)
    v_hat = apply_fn(params, z_t, t, cond, rng_drop).astype(jnp.float32)
    v_mse = jnp.mean(jnp.square(v_hat - v), axis=tuple(range(1, x.ndim)))
    w = v_space_weight(weighting, schedule.logsnr(t), snr_gamma)
    loss = jnp.mean(w * v_mse)
    return loss, {"loss": loss, "v_mse": v_mse.mean(), "t_mean": t.mean()}
