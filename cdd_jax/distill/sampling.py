"""Sampling a conditional network (read in its `prediction_type`): few-step distilled students
and baseline teachers.

All samplers start from z_T ~ N(0, I) at t = 1 and are deterministic given `rng` (DDIM and
DPM-Solver++ use it only for z_T). Jittable with the step count and grid static.

Two ways to go from one time of the grid to the next (`renoise`):
- "ddim" (the paper, ../shared/specs/codi.md section 3): z_s = alpha_s x_hat + sigma_s eps_hat with
  the noise the network implies, eps_hat = (z_t - alpha_t x_hat) / sigma_t; no noise re-injection.
- "fresh": z_s = alpha_s x_hat + sigma_s n with NEW Gaussian noise n (the multistep sampler of
  consistency models, Song et al. 2023, Algorithm 1). The next network input then has exactly the
  training distribution's noise, whereas eps_hat carries whatever the prediction got wrong; with
  an exact denoiser both give the data (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdd_jax.diffusion import SAMPLERS, Schedule, add_noise, released_grid, sample, time_grid
from cdd_jax.diffusion.parameterization import denoise
from cdd_jax.distill.baselines import consistency_fn
from cdd_jax.distill.codi import ApplyFn, as_model_fn, condition_image

GRIDS = ("uniform", "released")
RENOISE = ("ddim", "fresh")
# noise(i) -> the i-th Gaussian draw of a sampler, shaped like z: i = 0 is z_T, i >= 1 the fresh
# re-noising before step i. Given, it replaces the draws from `rng` (e.g. noise that is one field
# over a whole image cut into tiles, `cdd_jax.evaluate.tiling`).
NoiseFn = Callable[[int], jax.Array]


def sampling_grid(grid: str, num_steps: int, train_steps: int = 50) -> np.ndarray:
    """Descending times from 1 (or the released code's first time) to 0.

    "uniform": linspace(1, 0, K + 1). "released": the authors' grid reversed(arange(N) T / N)
    [::ceil(N / K)] / T followed by 0 (N = train_steps; e.g. K = 4: 0.98, 0.72, 0.46, 0.2, 0).
    """
    if grid == "uniform":
        return time_grid(num_steps)
    if grid == "released":
        return released_grid(num_steps, train_steps)
    raise ValueError(f"unknown sampling grid {grid!r}; valid: {GRIDS}")


def _start(cond: jax.Array | None, rng: jax.Array, shape: tuple[int, ...] | None,
           noise: NoiseFn | None = None) -> jax.Array:
    if noise is not None:
        return jnp.asarray(noise(0), jnp.float32)
    if shape is None:
        if cond is None:
            raise ValueError("give `shape` when sampling without a condition (cond is None)")
        shape = tuple(condition_image(cond).shape)
    return jax.random.normal(rng, shape, jnp.float32)


def solver_sample(
    apply_fn: ApplyFn,
    params: Any,
    cond: jax.Array | None,
    rng: jax.Array,
    *,
    schedule: Schedule,
    num_steps: int,
    sampler: str = "ddim",
    grid: str = "uniform",
    train_steps: int = 50,
    shape: tuple[int, ...] | None = None,
    noise: NoiseFn | None = None,
    prediction_type: str = "v_prediction",
) -> jax.Array:
    """Samples with DDIM or DPM-Solver++(2M) (no noise re-injection); returns x (NHWC).

    z_T has the shape of `cond` (the upsampled low-resolution image) unless `shape` is given.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    timesteps = sampling_grid(grid, num_steps, train_steps)
    z_T = _start(cond, rng, shape, noise)
    model_fn = as_model_fn(apply_fn, params, cond, z_T.shape[0])
    return sample(model_fn, z_T, schedule=schedule, sampler=sampler, timesteps=timesteps,
                  prediction_type=prediction_type)


def few_step_sample(
    apply_fn: ApplyFn,
    params: Any,
    cond: jax.Array | None,
    rng: jax.Array,
    *,
    schedule: Schedule,
    num_steps: int,
    grid: str = "uniform",
    train_steps: int = 50,
    shape: tuple[int, ...] | None = None,
    renoise: str = "ddim",
    noise: NoiseFn | None = None,
    prediction_type: str = "v_prediction",
) -> jax.Array:
    """K-step sampling of a distilled student; returns x. `renoise` (module docstring): "ddim"
    is the paper's few-step sampler, "fresh" re-noises each prediction with new noise.
    `noise` (optional, `NoiseFn`) supplies the Gaussian draws instead of `rng`."""
    if renoise == "ddim":
        return solver_sample(apply_fn, params, cond, rng, schedule=schedule,
                              num_steps=num_steps, sampler="ddim", grid=grid,
                              train_steps=train_steps, shape=shape, noise=noise,
                              prediction_type=prediction_type)
    if renoise != "fresh":
        raise ValueError(f"unknown renoise {renoise!r}; valid: {RENOISE}")
    timesteps = sampling_grid(grid, num_steps, train_steps)
    z = _start(cond, rng, shape, noise)  # The same z_T as "ddim": with K = 1 the two are identical.
    model_fn = as_model_fn(apply_fn, params, cond, z.shape[0])

    def predict(z_t, t):
        alpha, sigma = schedule.alpha_sigma(t)
        return denoise(prediction_type, z_t, model_fn(z_t, t), alpha, sigma)[0]

    return _renoise_fresh(predict, z, [float(t) for t in timesteps if t > 0], schedule,
                          jax.random.fold_in(rng, 1), noise)


def _renoise_fresh(predict, z: jax.Array, times: list[float], schedule: Schedule,
                   rng: jax.Array, noise_fn: NoiseFn | None = None) -> jax.Array:
    """x = predict(z, t_0); then for each later t: z = alpha_t x + sigma_t n (n fresh: drawn from
    `rng`, or `noise_fn(i)`), x = predict(z, t). `times` decreasing and positive; `predict(z, t)`
    takes t of shape (B,)."""
    x = z
    for i, t in enumerate(times):
        t_b = jnp.full((z.shape[0],), t, jnp.float32)
        if i > 0:
            alpha, sigma = schedule.alpha_sigma(t_b)
            noise = (jax.random.normal(jax.random.fold_in(rng, i), z.shape, jnp.float32)
                     if noise_fn is None else jnp.asarray(noise_fn(i), jnp.float32))
            z = add_noise(x, noise, alpha, sigma)
        x = predict(z, t_b)
    return x


def consistency_sample(
    apply_fn: ApplyFn,
    params: Any,
    cond: jax.Array | None,
    rng: jax.Array,
    *,
    schedule: Schedule,
    num_steps: int,
    cm_cfg: ml_collections.ConfigDict,
    grid: str = "uniform",
    train_steps: int = 50,
    shape: tuple[int, ...] | None = None,
    prediction_type: str = "v_prediction",
    noise: NoiseFn | None = None,
) -> jax.Array:
    """Multistep consistency sampling for the CM baseline: x = f(z, t_k), then re-noise to
    t_{k+1} with FRESH noise, over the grid's positive times; returns the last f. `noise`
    (optional, `NoiseFn`) supplies the Gaussian draws instead of `rng`."""
    timesteps = sampling_grid(grid, num_steps, train_steps)
    rng_start, rng_steps = jax.random.split(rng)
    z = _start(cond, rng_start, shape, noise)
    times = [float(t) for t in timesteps if t > cm_cfg.eps_t_min]
    return _renoise_fresh(
        lambda z_t, t: consistency_fn(apply_fn, params, z_t, t, cond, None, schedule=schedule,
                                      cm_cfg=cm_cfg, prediction_type=prediction_type),
        z, times, schedule, rng_steps, noise)
