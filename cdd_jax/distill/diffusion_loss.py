"""The plain diffusion loss in the network's own parameterisation: teacher pretraining and the
`finetune` baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cdd_jax.diffusion import Schedule, add_noise, check_prediction_type, prediction_target
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


def output_space_weight(kind: str, logsnr: jax.Array, gamma: float = 5.0,
                        prediction_type: str = "v_prediction") -> jax.Array:
    """Weight on the MSE of a network's own output that equals the named weighting.

    v: `v_space_weight`. eps: |eps - eps_hat|^2 = SNR |x - x_hat|^2, so "none" 1 (plain eps-MSE,
    the usual Stable Diffusion loss), "min_snr" min(SNR, gamma) / SNR, "truncated_snr"
    max(SNR, 1) / SNR, "snr_plus_one" (SNR + 1) / SNR. sample (x): "none" 1, "min_snr"
    min(SNR, gamma), "truncated_snr" max(SNR, 1), "snr_plus_one" SNR + 1.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return v_space_weight(kind, logsnr, gamma)
    if kind not in DIFFUSION_WEIGHTINGS:
        raise ValueError(f"unknown diffusion weighting {kind!r}; valid: {DIFFUSION_WEIGHTINGS}")
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if kind == "none":
        return jnp.ones_like(logsnr)
    if prediction_type == "epsilon":
        inv_snr = jnp.exp(-logsnr)
        if kind == "min_snr":
            return jnp.minimum(1.0, gamma * inv_snr)
        if kind == "truncated_snr":
            return jnp.maximum(1.0, inv_snr)
        return 1.0 + inv_snr
    snr = jnp.exp(logsnr)
    if kind == "min_snr":
        return jnp.minimum(snr, gamma)
    return jnp.maximum(snr, 1.0) if kind == "truncated_snr" else snr + 1.0


def diffusion_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    weighting: str = "none",
    snr_gamma: float = 5.0,
    prediction_type: str = "v_prediction",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """E_{t ~ U(0,1), eps} w(t) mean((f_theta(z_t, t, c) - y)^2), y the target of the network's
    prediction type (v = alpha_t eps - sigma_t x, eps, or x) and w the weighting written in that
    space (`output_space_weight`).

    t is drawn per example. `rng` is split as (t, eps, dropout). Returns (loss, metrics); the
    metric "mse" is the unweighted MSE of the output ("v_mse" for a v-prediction network).
    """
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t = jax.random.uniform(rng_t, (x.shape[0],), jnp.float32)
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = add_noise(x, eps, alpha_t, sigma_t)
    target = prediction_target(prediction_type, x, eps, alpha_t, sigma_t)
    out = apply_fn(params, z_t, t, cond, rng_drop).astype(jnp.float32)
    mse = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x.ndim)))
    w = output_space_weight(weighting, schedule.logsnr(t), snr_gamma, prediction_type)
    loss = jnp.mean(w * mse)
    name = "v_mse" if prediction_type == "v_prediction" else "mse"
    return loss, {"loss": loss, name: mse.mean(), "t_mean": t.mean()}
