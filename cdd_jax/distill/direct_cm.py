"""Direct consistency distillation ("Direct CM"): the consistency function regressed straight
onto the teacher's many-step ODE solve to t_min, instead of onto its own EMA one step earlier.

    t = t_min + (1 - t_min) k / N, k ~ U{1..N},  z_t = alpha_t x + sigma_t eps
    z_tmin = M teacher DDIM steps from z_t on linspace(t, t_min, M + 1)   (stop-gradient)
    L = d(f_theta(z_t, t), z_tmin)

f_theta is the CM baseline's `consistency_fn` (same c_skip / c_out, same cfg.cm section), so the
two differ only in the target: CM bootstraps sg f_theta_minus(z_hat_s, s) after ONE teacher step;
Direct CM needs no target EMA and its target is the teacher's ODE solution itself (up to the
M-step discretisation). With f(z, t_min) = z, the exact optimum is that M-step solve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.diffusion import Schedule, add_noise, ddim_step
from cdd_jax.distill.baselines import consistency_fn
from cdd_jax.distill.codi import ApplyFn, as_model_fn, distance, sample_codi_times, unpack_batch


def teacher_ode_solve(
    model_fn, z_t: jax.Array, t: jax.Array, t_end: float, num_steps: int, schedule: Schedule,
    prediction_type: str = "v_prediction",
) -> jax.Array:
    """`num_steps` DDIM steps from z_t at t (shape (B,)) to t_end on the per-example uniform grid
    t_i = t_end + (t - t_end)(1 - i / M); returns the state z at t_end (the plain DDIM formula,
    also on the last step, as the consistency boundary f(z, t_min) = z asks)."""
    if int(num_steps) < 1:
        raise ValueError(f"num_teacher_steps must be >= 1, got {num_steps!r}")
    fracs = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)

    def body(z, pair):
        t_cur, t_next = (t_end + (t - t_end) * f for f in pair)
        return ddim_step(model_fn, z, t_cur, t_next, schedule, prediction_type)[0], None

    z, _ = jax.lax.scan(body, z_t, (fracs[:-1], fracs[1:]))
    return z


def direct_cm_loss(
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
    """Direct CM loss d(f_theta(z_t, t), sg ODE_teacher(z_t, t -> t_min)).

    `finetuned_params`: the frozen fine-tuned conditional teacher, called with `apply_fn` (or
    `finetuned_apply_fn`) deterministically. Reads cfg.num_grid_steps, cfg.cm (scalings, distance,
    eps_t_min, per_example_t) and cfg.direct_cm.num_teacher_steps. Returns (loss, metrics).
    """
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t_min = cfg.cm.eps_t_min
    t, _ = sample_codi_times(rng_t, x.shape[0], cfg.num_grid_steps, cfg.cm.per_example_t)
    t = t_min + (1.0 - t_min) * t
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = add_noise(x, eps, alpha_t, sigma_t)

    teacher_fn = as_model_fn(
        finetuned_apply_fn or apply_fn, jax.lax.stop_gradient(finetuned_params), cond, x.shape[0]
    )
    # as_model_fn broadcasts a scalar t; here t is already per example, which it passes through.
    z_target = teacher_ode_solve(
        teacher_fn, z_t, t, t_min, cfg.direct_cm.num_teacher_steps, schedule, prediction_type
    )
    z_target = jax.lax.stop_gradient(z_target)

    f_theta = consistency_fn(apply_fn, params, z_t, t, cond, rng_drop, schedule=schedule,
                             cm_cfg=cfg.cm, prediction_type=prediction_type)
    d = distance(cfg.cm.distance, f_theta, z_target, huber_c=cfg.pseudo_huber_c)
    loss = jnp.mean(d)
    return loss, {"loss": loss, "t_mean": t.mean()}
