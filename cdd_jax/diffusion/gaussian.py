"""Exact diffusion quantities for Gaussian data: the known answers to check objectives against.

Data x ~ N(mu, Sigma) in R^d, observed through c = A x + n, n ~ N(0, s^2 I) (A: (d_c, d)). Then

    posterior      x | c ~ N(m(c), S),  m(c) = G c + g,  K = Sigma A^T (A Sigma A^T + s^2 I)^-1,
                   G = K,  g = mu - K A mu,  S = Sigma - K A Sigma   (S does not depend on c)
    denoiser       E[x | z_t] = mean + alpha_t C (alpha_t^2 C + sigma_t^2 I)^-1 (z_t - alpha_t mean)
                   for data N(mean, C); the conditional one is the same with (m(c), S).
    v-prediction   v_hat = alpha_t sigma_t (I - C) P^-1 z_t - sigma_t P^-1 mean,
                   P = alpha_t^2 C + sigma_t^2 I   (= E[alpha_t eps - sigma_t x | z_t], no 1/sigma)
    PF-ODE map     in the eigenbasis C = Q diag(lam) Q^T every coordinate evolves alone and the
                   flow is the monotone affine map between the marginals N(alpha_t mean_i,
                   alpha_t^2 lam_i + sigma_t^2), so from time t to time u:
                   z_u = alpha_u mean + Q diag(sqrt((alpha_u^2 lam + sigma_u^2) /
                         (alpha_t^2 lam + sigma_t^2))) Q^T (z_t - alpha_t mean)
                   (alpha_u = 1, sigma_u = 0 gives the map onto clean data x_0).
    W2             W2(N(m1, C1), N(m2, C2))^2
                       = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2).

Everything except `gaussian_apply_fn` is float64 numpy; alpha and sigma are Python floats here.
Affine maps are returned as matrices: a map z -> J z + H c + h is the tuple (J, H, h).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.diffusion.parameterization import (
    check_prediction_type,
    denoise,
    output_from_x_eps_hat,
)
from cdd_jax.diffusion.schedules import Schedule

__all__ = [
    "Posterior",
    "sqrtm_psd",
    "w2_gaussian",
    "expected_sq_norm",
    "posterior",
    "denoiser",
    "conditional_denoiser",
    "ode_map",
    "conditional_ode_map",
    "gaussian_v_params",
    "gaussian_apply_fn",
]


class Posterior(NamedTuple):
    """x | c ~ N(G c + g, S)."""

    G: np.ndarray
    g: np.ndarray
    S: np.ndarray


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _sym(m: np.ndarray) -> np.ndarray:
    return 0.5 * (m + m.T)


def sqrtm_psd(m) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (negative round-off clipped)."""
    lam, q = np.linalg.eigh(_sym(_f64(m)))
    return (q * np.sqrt(np.clip(lam, 0.0, None))) @ q.T


def w2_gaussian(m1, c1, m2, c2) -> float:
    """2-Wasserstein distance between N(m1, c1) and N(m2, c2)."""
    m1, c1, m2, c2 = _f64(m1), _f64(c1), _f64(m2), _f64(c2)
    r2 = sqrtm_psd(c2)
    cross = sqrtm_psd(r2 @ c1 @ r2)
    sq = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(cross)
    return float(np.sqrt(max(sq, 0.0)))


def expected_sq_norm(D, e, mean, cov) -> float:
    """E |D c + e|^2 for c ~ N(mean, cov): |D mean + e|^2 + tr(D cov D^T)."""
    D, e, mean, cov = _f64(D), _f64(e), _f64(mean), _f64(cov)
    return float(np.sum((D @ mean + e) ** 2) + np.trace(D @ cov @ D.T))


def posterior(mu, Sigma, A, noise_std: float) -> Posterior:
    """The exact posterior of x ~ N(mu, Sigma) given c = A x + N(0, noise_std^2 I)."""
    mu, Sigma, A = _f64(mu), _sym(_f64(Sigma)), _f64(A)
    obs_cov = A @ Sigma @ A.T + noise_std**2 * np.eye(A.shape[0])
    K = np.linalg.solve(obs_cov, A @ Sigma).T  # Sigma A^T obs_cov^-1 (obs_cov symmetric)
    return Posterior(G=K, g=mu - K @ (A @ mu), S=_sym(Sigma - K @ A @ Sigma))


def denoiser(mean, cov, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """E[x | z_t] = J z_t + j for data N(mean, cov): returns (J, j)."""
    mean, cov = _f64(mean), _sym(_f64(cov))
    P = alpha**2 * cov + sigma**2 * np.eye(cov.shape[0])
    J = alpha * np.linalg.solve(P, cov).T  # alpha cov P^-1 (both symmetric)
    return J, mean - alpha * J @ mean


def conditional_denoiser(post: Posterior, alpha: float, sigma: float):
    """E[x | z_t, c] = J z_t + H c + h: returns (J, H, h)."""
    J, _ = denoiser(np.zeros(post.S.shape[0]), post.S, alpha, sigma)
    B = np.eye(J.shape[0]) - alpha * J  # weight of m(c)
    return J, B @ post.G, B @ post.g


def ode_map(mean, cov, alpha_t: float, sigma_t: float, alpha_u: float = 1.0,
            sigma_u: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """PF-ODE map z_t -> z_u = M z_t + m for data N(mean, cov) (u = clean data by default)."""
    mean = _f64(mean)
    lam, q = np.linalg.eigh(_sym(_f64(cov)))
    lam = np.clip(lam, 0.0, None)
    ratio = np.sqrt((alpha_u**2 * lam + sigma_u**2) / (alpha_t**2 * lam + sigma_t**2))
    M = (q * ratio) @ q.T
    return M, alpha_u * mean - alpha_t * M @ mean


def conditional_ode_map(post: Posterior, alpha_t: float, sigma_t: float, alpha_u: float = 1.0,
                        sigma_u: float = 0.0):
    """Conditional PF-ODE map z_t -> M z_t + H c + h (data N(m(c), S)): returns (M, H, h)."""
    d = post.S.shape[0]
    M, _ = ode_map(np.zeros(d), post.S, alpha_t, sigma_t, alpha_u, sigma_u)
    B = alpha_u * np.eye(d) - alpha_t * M  # weight of m(c)
    return M, B @ post.G, B @ post.g


# --------------------------------------------------------------------------- exact networks


def gaussian_v_params(cov, mean_w=None, mean_b=None, cond_dim: int = 0) -> dict[str, jax.Array]:
    """Parameters of `gaussian_apply_fn` for data N(mean_w c + mean_b, cov) (float32).

    The unconditional teacher: mean_w = 0 (the default), mean_b = mu, cov = Sigma; the exact
    conditional denoiser: mean_w = G, mean_b = g, cov = S.
    """
    lam, q = np.linalg.eigh(_sym(_f64(cov)))
    d = lam.shape[0]
    mean_w = np.zeros((d, cond_dim)) if mean_w is None else _f64(mean_w)
    mean_b = np.zeros(d) if mean_b is None else _f64(mean_b)
    return {
        "eigvecs": jnp.asarray(q, jnp.float32),
        "eigvals": jnp.asarray(np.clip(lam, 0.0, None), jnp.float32),
        "mean_w": jnp.asarray(mean_w, jnp.float32),
        "mean_b": jnp.asarray(mean_b, jnp.float32),
    }


def gaussian_apply_fn(schedule: Schedule, prediction_type: str = "v_prediction"):
    """The exact denoiser of N(mean_w c + mean_b, Q diag(lam) Q^T) as a network
    `apply_fn(params, z_t, t, cond, rng) -> output` on flat data (B, d), t of shape (B,):

        v_hat = Q [alpha sigma (1 - lam) / p * Q^T z_t - sigma / p * Q^T mean],
        p = alpha^2 lam + sigma^2,

    output in `prediction_type`: v_hat itself, or eps_hat = sigma z_t + alpha v_hat ("epsilon"),
    or x_hat = alpha z_t - sigma v_hat ("sample") -- the same denoiser, no division.
    """
    check_prediction_type(prediction_type)

    def apply_fn(params: dict[str, Any], z, t, cond, rng=None):
        del rng
        alpha, sigma = schedule.alpha_sigma(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        q, lam = params["eigvecs"], params["eigvals"]
        mean = params["mean_b"]
        if cond is not None and params["mean_w"].shape[1]:
            mean = cond @ params["mean_w"].T + mean
        mean = jnp.broadcast_to(mean, z.shape)
        p = alpha**2 * lam + sigma**2
        coef = alpha * sigma * (1.0 - lam) / p * (z @ q) - sigma / p * (mean @ q)
        v_hat = coef @ q.T
        if prediction_type == "v_prediction":
            return v_hat
        x_hat, eps_hat = denoise("v_prediction", z, v_hat, alpha, sigma)
        return output_from_x_eps_hat(prediction_type, x_hat, eps_hat, alpha, sigma)

    return apply_fn
