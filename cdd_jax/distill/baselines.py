"""Baseline distillation objectives of the paper's Table 1: CM and GD.

Both distil a fine-tuned conditional teacher (trained with `diffusion_loss`) into a few-step
student initialised from it; the teacher network is called with the student's `apply_fn`
(same architecture) unless `finetuned_apply_fn` is given, always deterministically (rng None).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.diffusion import Schedule, add_noise, bcast, ddim_step, denoise
from cdd_jax.distill.codi import ApplyFn, as_model_fn, distance, sample_codi_times, unpack_batch
from cdd_jax.distill.config import GD_WEIGHTINGS

# --------------------------------------------------------------------------- CM


def cm_scalings(
    t: jax.Array, *, sigma_data: float, time_scale: float, t_min: float
) -> tuple[jax.Array, jax.Array]:
    """Consistency boundary scalings in the latent-consistency form, t' = time_scale * t:

    c_skip = sd^2 / ((t' - e)^2 + sd^2),  c_out = (t' - e) / sqrt(t'^2 + sd^2),  e = t'(t_min),
    so c_skip(t_min) = 1, c_out(t_min) = 0 and c_out -> 1 for large t' (x_hat is in data units).
    c_out follows the latent consistency models' code: without the sigma_data factor of Song et
    al.'s c_out = sd (t' - e) / sqrt(sd^2 + t'^2) (../shared/specs/codi.md section 6), whose
    network output is in units of sd; x_hat here is already in data units, and that factor
    would leave f(z, t) = sd x_hat (not x_hat) at large t'.
    """
    tp = time_scale * jnp.asarray(t, jnp.float32)
    delta = tp - time_scale * t_min
    c_skip = sigma_data**2 / (jnp.square(delta) + sigma_data**2)
    c_out = delta / jnp.sqrt(jnp.square(tp) + sigma_data**2)
    return c_skip, c_out


def consistency_fn(
    apply_fn: ApplyFn,
    params: Any,
    z_t: jax.Array,
    t: jax.Array,
    cond: jax.Array | None,
    rng: jax.Array | None,
    *,
    schedule: Schedule,
    cm_cfg: ml_collections.ConfigDict,
    prediction_type: str = "v_prediction",
) -> jax.Array:
    """f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x_hat_theta(z_t, t); f(z, t_min) = z exactly."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    out = apply_fn(params, z_t, t, cond, rng).astype(jnp.float32)
    x_hat, _ = denoise(prediction_type, z_t, out, alpha_t, sigma_t)
    c_skip, c_out = cm_scalings(
        t, sigma_data=cm_cfg.sigma_data, time_scale=cm_cfg.time_scale, t_min=cm_cfg.eps_t_min
    )
    return bcast(c_skip, z_t.ndim) * z_t + bcast(c_out, z_t.ndim) * x_hat


def cm_loss(
    apply_fn: ApplyFn,
    params: Any,
    target_params: Any,
    finetuned_params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    cfg: ml_collections.ConfigDict,
    finetuned_apply_fn: ApplyFn | None = None,
    prediction_type: str = "v_prediction",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Consistency distillation: d(f_theta(z_t, t), sg f_theta_minus(z_hat_s, s)).

    Grid t = t_min + (1 - t_min) k / N, s one step earlier (so s = t_min for k = 1, where the
    target is z_hat_s itself); z_hat_s is ONE teacher DDIM step t -> s from z_t.
    """
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t_min = cfg.cm.eps_t_min
    t, s = sample_codi_times(rng_t, x.shape[0], cfg.num_grid_steps, cfg.cm.per_example_t)
    t, s = t_min + (1.0 - t_min) * t, t_min + (1.0 - t_min) * s
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = add_noise(x, eps, alpha_t, sigma_t)

    teacher_fn = as_model_fn(
        finetuned_apply_fn or apply_fn, jax.lax.stop_gradient(finetuned_params), cond, x.shape[0]
    )
    z_hat_s, _ = ddim_step(teacher_fn, z_t, t, s, schedule, prediction_type)
    z_hat_s = jax.lax.stop_gradient(z_hat_s)

    kw = dict(schedule=schedule, cm_cfg=cfg.cm, prediction_type=prediction_type)
    f_theta = consistency_fn(apply_fn, params, z_t, t, cond, rng_drop, **kw)
    f_minus = consistency_fn(
        apply_fn, jax.lax.stop_gradient(target_params), z_hat_s, s, cond, None, **kw
    )
    d = distance(
        cfg.cm.distance, f_theta, jax.lax.stop_gradient(f_minus), huber_c=cfg.pseudo_huber_c
    )
    loss = jnp.mean(d)
    return loss, {"loss": loss, "t_mean": t.mean()}


# --------------------------------------------------------------------------- GD


def gd_target(
    z_t: jax.Array,
    z_tt: jax.Array,
    alpha_t: jax.Array,
    sigma_t: jax.Array,
    alpha_tt: jax.Array,
    sigma_tt: jax.Array,
) -> jax.Array:
    """x_tilde such that ONE DDIM step z_t -> t'' with x_hat = x_tilde lands on z'' (= z_tt):

    x_tilde = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t).
    """
    n = z_t.ndim
    ratio = bcast(sigma_tt / sigma_t, n)
    return (z_tt - ratio * z_t) / (bcast(alpha_tt, n) - ratio * bcast(alpha_t, n))


def gd_loss(
    apply_fn: ApplyFn,
    params: Any,
    finetuned_params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    cfg: ml_collections.ConfigDict,
    finetuned_apply_fn: ApplyFn | None = None,
    prediction_type: str = "v_prediction",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Guided / progressive distillation (Salimans & Ho 2022; Meng et al. 2023), one round.

    N = cfg.num_grid_steps is the TEACHER's step count this round; the student learns N/2 steps:
    t = 2k/N, k ~ U{1..N/2}; the teacher takes t -> t - 1/N -> t - 2/N =: t''; the student's
    x_hat at (z_t, t) regresses onto x_tilde (gd_target) with weight max(SNR_t, 1). Next round:
    the student becomes the teacher and N -> N/2.
    """
    n_steps = cfg.num_grid_steps
    if n_steps % 2:
        raise ValueError(f"gd needs an even num_grid_steps (teacher steps), got {n_steps}")
    if cfg.gd.weighting not in GD_WEIGHTINGS:
        raise ValueError(f"unknown gd weighting {cfg.gd.weighting!r}; valid: {GD_WEIGHTINGS}")
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t, t_tt = sample_codi_times(rng_t, x.shape[0], n_steps // 2, cfg.gd.per_example_t)
    t_mid = t - 1.0 / n_steps
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_tt, sigma_tt = schedule.alpha_sigma(t_tt)
    z_t = add_noise(x, eps, alpha_t, sigma_t)

    teacher_fn = as_model_fn(
        finetuned_apply_fn or apply_fn, jax.lax.stop_gradient(finetuned_params), cond, x.shape[0]
    )
    z_mid, _ = ddim_step(teacher_fn, z_t, t, t_mid, schedule, prediction_type)
    z_tt, _ = ddim_step(teacher_fn, z_mid, t_mid, t_tt, schedule, prediction_type)
    x_tilde = jax.lax.stop_gradient(gd_target(z_t, z_tt, alpha_t, sigma_t, alpha_tt, sigma_tt))

    out = apply_fn(params, z_t, t, cond, rng_drop).astype(jnp.float32)
    x_hat, _ = denoise(prediction_type, z_t, out, alpha_t, sigma_t)
    if cfg.gd.weighting == "truncated_snr":
        w = jnp.maximum(schedule.snr(t), 1.0)
    else:
        w = jnp.ones_like(t)
    d_x = distance("l2", x_hat, x_tilde)
    loss = jnp.mean(w * d_x)
    return loss, {"loss": loss, "d_x": d_x.mean(), "t_mean": t.mean()}
