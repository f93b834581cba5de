"""Sampling a conditional v-prediction network: few-step distilled students and baseline teachers.

All samplers start from z_T ~ N(0, I) at t = 1 and are deterministic given `rng` (DDIM and
DPM-Solver++ use it only for z_T). Jittable with the step count and grid static.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdd_jax.diffusion import SAMPLERS, Schedule, add_noise, released_grid, sample, time_grid
from cdd_jax.distill.baselines import consistency_fn
from cdd_jax.distill.codi import ApplyFn, as_model_fn

GRIDS = ("uniform", "released")


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


def _start(cond: jax.Array | None, rng: jax.Array, shape: tuple[int, ...] | None) -> jax.Array:
    if shape is None:
        if cond is None:
            raise ValueError("give `shape` when sampling without a condition (cond is None)")
        shape = tuple(cond.shape)
    return jax.random.normal(rng, shape, jnp.float32)


def teacher_sample(
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
) -> jax.Array:
    """Samples with DDIM or DPM-Solver++(2M) (no noise re-injection); returns x (NHWC).

    z_T has the shape of `cond` (the upsampled low-resolution image) unless `shape` is given.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    timesteps = sampling_grid(grid, num_steps, train_steps)
    z_T = _start(cond, rng, shape)
    model_fn = as_model_fn(apply_fn, params, cond, z_T.shape[0])
    return sample(model_fn, z_T, schedule=schedule, sampler=sampler, timesteps=timesteps)


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
) -> jax.Array:
    """K-step DDIM sampling of a distilled student (the paper's few-step sampler); returns x."""
    return teacher_sample(
        apply_fn,
        params,
        cond,
        rng,
        schedule=schedule,
        num_steps=num_steps,
        sampler="ddim",
        grid=grid,
        train_steps=train_steps,
        shape=shape,
    )


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
) -> jax.Array:
    """Multistep consistency sampling for the CM baseline: x = f(z, t_k), then re-noise to
    t_{k+1} with FRESH noise, over the grid's positive times; returns the last f."""
    timesteps = sampling_grid(grid, num_steps, train_steps)
    rng_start, rng_steps = jax.random.split(rng)
    z = _start(cond, rng_start, shape)
    batch_size = z.shape[0]
    times = [float(t) for t in timesteps if t > cm_cfg.eps_t_min]
    x = z
    for i, t in enumerate(times):
        t_b = jnp.full((batch_size,), t, jnp.float32)
        if i > 0:
            alpha, sigma = schedule.alpha_sigma(t_b)
            noise = jax.random.normal(jax.random.fold_in(rng_steps, i), z.shape, jnp.float32)
            z = add_noise(x, noise, alpha, sigma)
        x = consistency_fn(apply_fn, params, z, t_b, cond, None, schedule=schedule, cm_cfg=cm_cfg)
    return x
