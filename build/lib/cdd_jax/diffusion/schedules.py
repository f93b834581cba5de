"""Noise schedules of the continuous-time variance-preserving (VP) diffusion.

    z_t = alpha_t * x + sigma_t * eps,   alpha_t^2 + sigma_t^2 = 1,   t in [0, 1]
    logsnr(t) = log(alpha_t^2 / sigma_t^2), strictly decreasing in t.

A schedule is a small frozen dataclass: hashable, so it can be a static argument of `jax.jit`
or be closed over by a jitted function. Every method takes `t` of any shape (numpy, jax or a
Python float) and returns float32 jax arrays of the same shape. `t` must lie in [0, 1]; this is
checked for numpy and Python inputs (jax arrays may be traced and are not checked).

Three schedules (`get_schedule(name, **kwargs)`):

- "cosine": alpha_t ~ cos(pi t / 2) with logsnr clipped to [logsnr_min, logsnr_max] through the
  shifted-tan form logsnr(t) = -2 log tan(a t + b), b = arctan(exp(-logsnr_max / 2)),
  a = arctan(exp(-logsnr_min / 2)) - b. Then alpha_t = cos(a t + b), sigma_t = sin(a t + b)
  (identical to sqrt(sigmoid(+-logsnr)), but exact in float32 at both ends).
- "linear": the continuous VP-SDE of Song et al. (2021), beta(t) = beta_min + (beta_max -
  beta_min) t, log alpha_t^2 = -(beta_min t + (beta_max - beta_min) t^2 / 2). alpha_0 = 1,
  sigma_0 = 0 and logsnr(0) = +inf.
- "scaled_linear": the discrete DDPM schedule of Stable Diffusion (T = 1000, betas =
  linspace(sqrt(0.00085), sqrt(0.012), T)^2, alpha_bar = cumprod(1 - betas)) on continuous time
  t = i / T, i = 0..T-1: alpha(i / T)^2 = alpha_bar[i]. Between grid points logsnr is linearly
  interpolated; on ((T-1)/T, 1] it is linearly extrapolated with the last segment's slope. Note
  that alpha(0)^2 = alpha_bar[0] = 1 - 0.00085 < 1: t = 0 is the teacher's least noisy level,
  not clean data (the samplers treat the final step to t = 0 as "return x_hat").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "CosineSchedule",
    "LinearSchedule",
    "ScaledLinearSchedule",
    "SCHEDULES",
    "get_schedule",
]


def _as_time(t: Any) -> jax.Array:
    """Converts `t` to float32; numpy / Python inputs are checked to lie in [0, 1].

    jax arrays are not checked (they may be traced, and a check would force a device sync).
    """
    if not isinstance(t, jax.Array):
        t_np = np.asarray(t)
        if not np.issubdtype(t_np.dtype, np.number) or np.issubdtype(
            t_np.dtype, np.complexfloating
        ):
            raise TypeError(f"t must be a real array, got dtype {t_np.dtype}")
        if t_np.size and (np.any(~np.isfinite(t_np)) or t_np.min() < 0.0 or t_np.max() > 1.0):
            raise ValueError(f"t must lie in [0, 1]; got values in [{t_np.min()}, {t_np.max()}]")
    return jnp.asarray(t, dtype=jnp.float32)


class Schedule:
    """Base class: subclasses define `alpha_sigma` and `logsnr`; the rest derives from them."""

    name: ClassVar[str]

    def alpha_sigma(self, t: Any) -> tuple[jax.Array, jax.Array]:
        """Returns (alpha_t, sigma_t), float32, same shape as t."""
        raise NotImplementedError

    def logsnr(self, t: Any) -> jax.Array:
        """Returns log(alpha_t^2 / sigma_t^2), float32, same shape as t."""
        raise NotImplementedError

    def alpha(self, t: Any) -> jax.Array:
        """Signal scale alpha_t."""
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Any) -> jax.Array:
        """Noise scale sigma_t."""
        return self.alpha_sigma(t)[1]

    def snr(self, t: Any) -> jax.Array:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
        return jnp.exp(self.logsnr(t))


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
    """Cosine schedule with logsnr clipped to [logsnr_min, logsnr_max] (shifted-tan form)."""

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self):
        if not (math.isfinite(self.logsnr_min) and math.isfinite(self.logsnr_max)):
            raise ValueError(
                f"cosine: logsnr_min/max must be finite, got {self.logsnr_min}, {self.logsnr_max}"
            )
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"cosine: need logsnr_min < logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}"
            )

    def _angle(self, t: Any) -> jax.Array:
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
        return a * _as_time(t) + b

    def alpha_sigma(self, t: Any) -> tuple[jax.Array, jax.Array]:
        angle = self._angle(t)
        return jnp.cos(angle), jnp.sin(angle)

    def logsnr(self, t: Any) -> jax.Array:
        return -2.0 * jnp.log(jnp.tan(self._angle(t)))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
    """Continuous VP-SDE with linear beta(t) from beta_min to beta_max."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name: ClassVar[str] = "linear"

    def __post_init__(self):
        if not (0.0 < self.beta_min <= self.beta_max and math.isfinite(self.beta_max)):
            raise ValueError(
                f"linear: need 0 < beta_min <= beta_max < inf, got {self.beta_min}, {self.beta_max}"
            )

    def _log_alpha_sq(self, t: Any) -> jax.Array:
        t = _as_time(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def alpha_sigma(self, t: Any) -> tuple[jax.Array, jax.Array]:
        log_a2 = self._log_alpha_sq(t)
        return jnp.exp(0.5 * log_a2), jnp.sqrt(-jnp.expm1(log_a2))

    def logsnr(self, t: Any) -> jax.Array:
        log_a2 = self._log_alpha_sq(t)
        return log_a2 - jnp.log(-jnp.expm1(log_a2))  # +inf at t = 0


@functools.lru_cache(maxsize=8)
def _discrete_logsnr_table(beta_start: float, beta_end: float, num_train_timesteps: int):
    """logsnr of the discrete scaled-linear DDPM schedule at i = 0..T-1, computed in float64."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps) ** 2
    log_alpha_bar = np.cumsum(np.log1p(-betas))
    table = log_alpha_bar - np.log(-np.expm1(log_alpha_bar))
    table.setflags(write=False)
    return table


@dataclasses.dataclass(frozen=True)
class ScaledLinearSchedule(Schedule):
    """Stable Diffusion's discrete schedule on t = i / T, logsnr linearly interpolated."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    name: ClassVar[str] = "scaled_linear"

    def __post_init__(self):
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise ValueError(
                f"scaled_linear: num_train_timesteps must be an int >= 2, "
                f"got {self.num_train_timesteps!r}"
            )
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError(
                f"scaled_linear: need 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start}, {self.beta_end}"
            )

    @property
    def logsnr_table(self) -> np.ndarray:
        """float64 logsnr at the discrete timesteps i = 0..T-1 (read-only)."""
        return _discrete_logsnr_table(self.beta_start, self.beta_end, self.num_train_timesteps)

    def logsnr(self, t: Any) -> jax.Array:
        num = self.num_train_timesteps
        table = jnp.asarray(self.logsnr_table, dtype=jnp.float32)
        u = _as_time(t) * num  # fractional discrete index
        i = jnp.clip(jnp.floor(u), 0, num - 2).astype(jnp.int32)
        frac = u - i  # in [0, 1) inside the grid, in (1, 2] on the extrapolated last stretch
        lo, hi = table[i], table[i + 1]
        return lo + frac * (hi - lo)

    def alpha_sigma(self, t: Any) -> tuple[jax.Array, jax.Array]:
        logsnr = self.logsnr(t)
        return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


SCHEDULES: dict[str, type[Schedule]] = {
    CosineSchedule.name: CosineSchedule,
    LinearSchedule.name: LinearSchedule,
    ScaledLinearSchedule.name: ScaledLinearSchedule,
}


def get_schedule(name: str, **kwargs: Any) -> Schedule:
    """Builds the schedule called `name` ("cosine", "linear", "scaled_linear").

    Keyword arguments override the schedule's fields (cosine: logsnr_min, logsnr_max; linear:
    beta_min, beta_max; scaled_linear: beta_start, beta_end, num_train_timesteps).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(
            f"schedule {name!r} got unknown arguments {unknown}; valid: {sorted(fields)}"
        )
    return cls(**kwargs)
