"""Exact conversions between the x-, eps- and v-parameterisations of a VP diffusion model.

    z_t = alpha_t x + sigma_t eps,        v = alpha_t eps - sigma_t x      (alpha^2 + sigma^2 = 1)
    x   = alpha_t z_t - sigma_t v,        eps = sigma_t z_t + alpha_t v

So one network output can be read as a v-, x- or eps-prediction (x_hat, eps_hat, v_hat). A
network's own parameterisation is its *prediction type* (diffusers' names, `PREDICTION_TYPES`):
"v_prediction", "epsilon" or "sample"; `denoise` reads any of them as (x_hat, eps_hat) and
`prediction_target` gives the regression target of each. All
functions are plain arithmetic on their inputs: numpy float64 in gives numpy float64 out, jax in
gives jax out. alpha and sigma may be Python scalars, 0-d arrays or per-example arrays of shape
(B,), broadcast against (B, H, W, C) (or any rank) data by `bcast`. The conversions through
1/alpha (`x_from_eps`, `v_from_eps`) or 1/sigma (`eps_from_x`, `v_from_x`) are ill-conditioned
where that scale is tiny (pure noise, resp. clean data); the v-based ones never divide.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "bcast",
    "add_noise",
    "v_from_x_eps",
    "x_from_v",
    "eps_from_v",
    "x_from_eps",
    "eps_from_x",
    "v_from_x",
    "v_from_eps",
    "LOSS_WEIGHTS",
    "loss_weight",
    "PREDICTION_TYPES",
    "check_prediction_type",
    "denoise",
    "prediction_target",
    "output_from_x_eps_hat",
]

Array = Any  # a jax or numpy array


def bcast(a: Array | float, ndim: int) -> Array:
    """Appends trailing unit axes to `a` (a scalar or a (B,) array) so it broadcasts at `ndim`.

    (B,) -> (B, 1, 1, 1) for ndim = 4; Python scalars are returned unchanged.
    """
    if isinstance(a, (int, float)):
        return a
    if not hasattr(a, "reshape"):
        a = np.asarray(a)
    if a.ndim > ndim:
        raise ValueError(f"cannot broadcast an array of shape {a.shape} to rank {ndim}")
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _scales(alpha, sigma, ref) -> tuple[Array, Array]:
    ndim = np.ndim(ref)
    return bcast(alpha, ndim), bcast(sigma, ndim)


def add_noise(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """Forward process: z_t = alpha_t x + sigma_t eps."""
    a, s = _scales(alpha, sigma, x)
    return a * x + s * eps


def v_from_x_eps(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """Velocity target: v = alpha_t eps - sigma_t x."""
    a, s = _scales(alpha, sigma, x)
    return a * eps - s * x


def x_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """Signal prediction from a v-prediction: x_hat = alpha_t z_t - sigma_t v_hat."""
    a, s = _scales(alpha, sigma, z)
    return a * z - s * v


def eps_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """Noise prediction from a v-prediction: eps_hat = sigma_t z_t + alpha_t v_hat."""
    a, s = _scales(alpha, sigma, z)
    return s * z + a * v


def x_from_eps(z: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """x_hat = (z_t - sigma_t eps_hat) / alpha_t  (divides by alpha_t)."""
    a, s = _scales(alpha, sigma, z)
    return (z - s * eps) / a


def eps_from_x(z: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """eps_hat = (z_t - alpha_t x_hat) / sigma_t  (divides by sigma_t)."""
    a, s = _scales(alpha, sigma, z)
    return (z - a * x) / s


def v_from_x(z: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """v_hat = (alpha_t z_t - x_hat) / sigma_t  (divides by sigma_t)."""
    a, s = _scales(alpha, sigma, z)
    return (a * z - x) / s


def v_from_eps(z: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v_hat = (eps_hat - sigma_t z_t) / alpha_t  (divides by alpha_t)."""
    a, s = _scales(alpha, sigma, z)
    return (eps - s * z) / a


# What a network outputs, in diffusers' names (a scheduler config's `prediction_type`).
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


def check_prediction_type(prediction_type: str) -> str:
    """Returns `prediction_type`; ValueError naming the valid ones otherwise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; valid: {PREDICTION_TYPES}")
    return prediction_type


def denoise(prediction_type: str, z: Array, out: Array, alpha: Array,
            sigma: Array) -> tuple[Array, Array]:
    """(x_hat, eps_hat) from a network output `out` of the given prediction type at z_t.

    "v_prediction": no division; "epsilon": x_hat divides by alpha_t (eps_hat is the output
    itself); "sample": eps_hat divides by sigma_t (x_hat is the output itself).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return x_from_v(z, out, alpha, sigma), eps_from_v(z, out, alpha, sigma)
    if prediction_type == "epsilon":
        return x_from_eps(z, out, alpha, sigma), out
    return out, eps_from_x(z, out, alpha, sigma)


def prediction_target(prediction_type: str, x: Array, eps: Array, alpha: Array,
                      sigma: Array) -> Array:
    """What a network of this prediction type should output at z_t = alpha x + sigma eps."""
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return v_from_x_eps(x, eps, alpha, sigma)
    return eps if prediction_type == "epsilon" else x


def output_from_x_eps_hat(prediction_type: str, x_hat: Array, eps_hat: Array, alpha: Array,
                          sigma: Array) -> Array:
    """The output of this prediction type that denoises to (x_hat, eps_hat) (the inverse of
    `denoise` when x_hat and eps_hat are consistent with z_t; no division)."""
    return prediction_target(prediction_type, x_hat, eps_hat, alpha, sigma)


# Per-example loss weights w(logsnr). With z_t fixed, the errors in the three spaces are tied by
#   |eps - eps_hat|^2 = snr |x - x_hat|^2,   |v - v_hat|^2 = (snr + 1) |x - x_hat|^2,
# so a weight on one space is the same objective as a rescaled weight on another.
LOSS_WEIGHTS = {
    # Unweighted.
    "none": "w = 1",
    # Min-SNR-gamma (Hang et al., ICCV 2023), for an EPS-space loss: min(snr, gamma) / snr.
    # Equivalent to min(snr, gamma) on an x-space loss, min(snr, gamma) / (snr + 1) on v-space.
    "min_snr": "w = min(snr, gamma) / snr   (eps-space loss)",
    # "Truncated SNR" (Salimans & Ho 2022, progressive distillation), for an X-space loss:
    # max(snr, 1); this is the weight of the GD / progressive-distillation baseline.
    "truncated_snr": "w = max(snr, 1)   (x-space loss)",
    # "SNR+1" (Salimans & Ho 2022), for an X-space loss: snr + 1, i.e. exactly the v-space MSE.
    "snr_plus_one": "w = snr + 1   (x-space loss; = unweighted v-space loss)",
}


def loss_weight(kind: str, logsnr: Array, gamma: float = 5.0) -> Array:
    """Loss weight w(t) as a function of logsnr(t); see LOSS_WEIGHTS for the space each assumes.

    kind: "none" (1), "min_snr" (min(snr, gamma) / snr, for eps-space losses), "truncated_snr"
    (max(snr, 1), for x-space losses) or "snr_plus_one" (snr + 1, for x-space losses).
    Returns float32 of logsnr's shape. logsnr = +inf (clean data) is allowed.
    """
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss weight {kind!r}; valid kinds: {sorted(LOSS_WEIGHTS)}")
    if isinstance(gamma, (int, float)) and not gamma > 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    logsnr = jnp.asarray(logsnr, dtype=jnp.float32)
    if kind == "none":
        return jnp.ones_like(logsnr)
    if kind == "min_snr":
        return jnp.minimum(1.0, gamma * jnp.exp(-logsnr))  # = min(snr, gamma) / snr, no inf/inf
    snr = jnp.exp(logsnr)
    if kind == "truncated_snr":
        return jnp.maximum(snr, 1.0)
    return snr + 1.0
