"""Deterministic samplers of the probability-flow ODE.

`model_fn(z, t) -> output` with t a float32 scalar array; the output is read in the network's
own parameterisation (`prediction_type`: "v_prediction" by default, "epsilon", "sample").
Two solvers on a descending time grid t_0 = t_max > t_1 > ... > t_K (usually 1 -> 0):

- DDIM (first order): z_s = alpha_s x_hat(z_t, t) + sigma_s eps_hat(z_t, t), no noise re-injected.
- DPM-Solver++(2M) (Lu et al. 2022, second-order multistep in the data prediction), with
  lambda = log(alpha / sigma) and h = lambda_s - lambda_t:
      z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D,
      D = x_hat_t on the first step, D = (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_prev, r = h_prev / h.
  With D = x_hat_t the update is algebraically the DDIM step.

The final step to t = 0 returns x_hat (the model's clean estimate at the last positive time),
for both solvers and all schedules:
- for "linear", alpha_0 = 1 and sigma_0 = 0, so the DDIM update at s = 0 *is* x_hat;
- for "cosine" the clipped logsnr gives alpha_0 = cos(b) ~ 1 - 1.5e-7, sigma_0 ~ 5.5e-4, and for
  "scaled_linear" alpha_0^2 = alpha_bar[0] = 0.99915: t = 0 is a (barely) noisy level there,
  but a sampler's output should be the clean image, so we return x_hat instead of z_0;
- DPM-Solver++ takes this last step at first order (its "lower_order_final"): lambda_0 is
  infinite (linear) or very large, so r = h_prev / h -> 0 and the 1/(2r) extrapolation of the
  second-order D would be unbounded / ill-conditioned.
`ddim_step` itself always applies the plain formula with alpha_s, sigma_s (what distillation
targets need, since the teacher was trained at those noise levels); only `sample` substitutes
x_hat on the final step. A grid ending at t_K > 0 returns z_{t_K}.

Everything here is jittable; the time grid is a static numpy array, the loop is `lax.scan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.diffusion.parameterization import bcast, check_prediction_type, denoise
from cdd_jax.diffusion.schedules import Schedule

__all__ = [
    "SAMPLERS",
    "time_grid",
    "released_grid",
    "ddim_step",
    "dpmpp_2m_step",
    "sample",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("ddim", "dpmpp_2m")


# --------------------------------------------------------------------------- time grids


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def time_grid(num_steps: int, t_max: float = 1.0, t_min: float = 0.0) -> np.ndarray:
    """num_steps + 1 uniformly spaced times from t_max down to t_min (float64, descending)."""
    num_steps = _check_int("num_steps", num_steps, 1)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    return np.linspace(t_max, t_min, num_steps + 1)


def released_grid(num_steps: int, train_steps: int = 50, T: int = 1000) -> np.ndarray:
    """The few-step grid of the CoDi authors' released code, in continuous time, ending at 0.

    Discrete times reversed(arange(N) * T / N)[::ceil(N / K)] (N = train_steps, K = num_steps),
    divided by T, followed by 0.0; e.g. N = 50, K = 4: [0.98, 0.72, 0.46, 0.20, 0.0]. When the
    strided grid already ends at 0 (e.g. N = 50, K = 8: 0.98, 0.84, ..., 0.14, 0.0) no second 0
    is appended, so the grid stays strictly descending and has fewer than K + 1 points (the
    released code's model call at t = 0 is dropped: x_hat of the step into 0 is the output).
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    train_steps = _check_int("train_steps", train_steps, 1)
    T = _check_int("T", T, 1)
    discrete = (np.arange(train_steps) * T / train_steps)[::-1][
        :: math.ceil(train_steps / num_steps)
    ]
    grid = discrete / T
    if grid[-1] > 0.0:
        grid = np.append(grid, 0.0)
    return grid


def _check_grid(timesteps: Any) -> np.ndarray:
    try:
        grid = np.asarray(timesteps, dtype=np.float64)
    except jax.errors.TracerArrayConversionError as e:
        raise TypeError("timesteps must be concrete (numpy or a list), not a traced array") from e
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"timesteps must be a 1-D array of >= 2 times, got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or grid.min() < 0.0 or grid.max() > 1.0:
        raise ValueError(f"timesteps must lie in [0, 1], got {grid}")
    if not np.all(np.diff(grid) < 0):
        raise ValueError(f"timesteps must be strictly descending, got {grid}")
    return grid


# --------------------------------------------------------------------------- single steps


def _predict(model_fn: ModelFn, z_t, t, schedule: Schedule, prediction_type: str):
    """Runs the model once; returns (x_hat, eps_hat)."""
    t = jnp.asarray(t, dtype=jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    return denoise(prediction_type, z_t, model_fn(z_t, t), alpha_t, sigma_t)


def ddim_step(model_fn: ModelFn, z_t: jax.Array, t, s, schedule: Schedule,
              prediction_type: str = "v_prediction"):
    """One DDIM step t -> s: z_s = alpha_s x_hat + sigma_s eps_hat. Returns (z_s, x_hat).

    t and s are scalars (or (B,) arrays); the plain formula is used for every s, including s = 0
    (see the module docstring: `sample` returns x_hat on its final step instead).
    """
    x_hat, eps_hat = _predict(model_fn, z_t, t, schedule, prediction_type)
    alpha_s, sigma_s = schedule.alpha_sigma(jnp.asarray(s, dtype=jnp.float32))
    ndim = z_t.ndim
    return bcast(alpha_s, ndim) * x_hat + bcast(sigma_s, ndim) * eps_hat, x_hat


def _half_lambda(schedule: Schedule, t) -> jax.Array:
    return 0.5 * schedule.logsnr(t)  # lambda = log(alpha / sigma)


def dpmpp_2m_step(
    model_fn: ModelFn,
    z_t: jax.Array,
    t,
    s,
    schedule: Schedule,
    x_hat_prev: jax.Array | None = None,
    h_prev: jax.Array | None = None,
    prediction_type: str = "v_prediction",
):
    """One DPM-Solver++(2M) step t -> s. Returns (z_s, x_hat_t, h).

    Pass the previous step's x_hat and h (= lambda_t - lambda_prev) for the second-order update;
    leave them None on the first step (first order, identical to DDIM). Feed the returned
    (x_hat_t, h) into the next call. s must be > 0 on a schedule with logsnr(0) = inf.
    """
    if (x_hat_prev is None) != (h_prev is None):
        raise ValueError("pass both x_hat_prev and h_prev, or neither (first step)")
    t = jnp.asarray(t, dtype=jnp.float32)
    s = jnp.asarray(s, dtype=jnp.float32)
    x_hat, _ = _predict(model_fn, z_t, t, schedule, prediction_type)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    h = _half_lambda(schedule, s) - _half_lambda(schedule, t)
    if x_hat_prev is None:
        d = x_hat
    else:
        half_inv_r = bcast(0.5 * h / h_prev, z_t.ndim)  # 1 / (2r), r = h_prev / h
        d = (1.0 + half_inv_r) * x_hat - half_inv_r * x_hat_prev
    ndim = z_t.ndim
    z_s = bcast(sigma_s / sigma_t, ndim) * z_t - bcast(alpha_s * jnp.expm1(-h), ndim) * d
    return z_s, x_hat, h


# --------------------------------------------------------------------------- full sampling


def _resolve_grid(num_steps: int | None, timesteps: Any) -> np.ndarray:
    """The descending time grid from `num_steps` or explicit `timesteps` (checked to agree)."""
    if timesteps is None:
        if num_steps is None:
            raise ValueError("give num_steps or timesteps")
        return time_grid(num_steps)
    grid = _check_grid(timesteps)
    if num_steps is not None and _check_int("num_steps", num_steps, 1) != grid.size - 1:
        raise ValueError(
            f"num_steps={num_steps} but timesteps has {grid.size} times ({grid.size - 1} steps)"
        )
    return grid


def sample(
    model_fn: ModelFn,
    z_T: jax.Array,
    *,
    schedule: Schedule,
    num_steps: int | None = None,
    sampler: str = "ddim",
    timesteps: Any = None,
    return_trajectory: bool = False,
    prediction_type: str = "v_prediction",
):
    """Integrates the PF-ODE from z_T along a descending time grid; returns x (and trajectory).

    Args:
      model_fn: (z, t) -> the network output, t a float32 scalar array.
      z_T: the starting state at timesteps[0] (usually pure noise at t = 1).
      schedule: a `Schedule`.
      num_steps: number of model calls; the grid defaults to time_grid(num_steps). Optional when
        `timesteps` is given, otherwise it must equal len(timesteps) - 1.
      prediction_type: what model_fn outputs: "v_prediction", "epsilon" or "sample".
      sampler: "ddim" or "dpmpp_2m".
      timesteps: optional concrete, strictly descending times in [0, 1], including the final time.
      return_trajectory: also return the states at every grid time, shape (K + 1, *z_T.shape):
        z_T first and the returned x last.

    Returns x, the state at the last grid time, where a final time of 0 yields x_hat of the last
    model call (see the module docstring). Jittable for a static grid.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {list(SAMPLERS)}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    check_prediction_type(prediction_type)
    grid = _resolve_grid(num_steps, timesteps)
    z_T = jnp.asarray(z_T)
    kind = dict(prediction_type=prediction_type)
    to_zero = grid[-1] == 0.0
    # The last step into t = 0 is taken separately (x_hat is returned); the rest runs in a scan.
    t_cur = jnp.asarray(grid[:-1], dtype=jnp.float32)
    t_next = jnp.asarray(grid[1:], dtype=jnp.float32)
    num_scan = grid.size - 1 - int(to_zero)
    states = [z_T[None]]

    if sampler == "ddim":

        def body(z, ts):
            z_s, _ = ddim_step(model_fn, z, ts[0], ts[1], schedule, **kind)
            return z_s, z_s

        z, zs = jax.lax.scan(body, z_T, (t_cur[:num_scan], t_next[:num_scan]))
        states.append(zs)
        if to_zero:
            _, z = ddim_step(model_fn, z, t_cur[-1], t_next[-1], schedule, **kind)
            states.append(z[None])
    else:
        z, x_prev, h_prev = z_T, None, None
        if num_scan >= 1:  # first step: first order
            z, x_prev, h_prev = dpmpp_2m_step(model_fn, z, t_cur[0], t_next[0], schedule,
                                              **kind)
            states.append(z[None])
        if num_scan >= 2:

            def body(carry, ts):
                z, x_prev, h_prev = carry
                z_s, x_hat, h = dpmpp_2m_step(model_fn, z, ts[0], ts[1], schedule, x_prev, h_prev,
                                              **kind)
                return (z_s, x_hat, h), z_s

            (z, x_prev, h_prev), zs = jax.lax.scan(
                body, (z, x_prev, h_prev), (t_cur[1:num_scan], t_next[1:num_scan])
            )
            states.append(zs)
        if to_zero:  # lower-order final step: the data prediction at the last positive time
            z, _ = _predict(model_fn, z, t_cur[-1], schedule, prediction_type)
            states.append(z[None])

    if return_trajectory:
        return z, jnp.concatenate(states, axis=0)
    return z
