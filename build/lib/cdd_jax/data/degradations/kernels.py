"""Blur kernels of the Real-ESRGAN degradation: Gaussian, generalised Gaussian, plateau, sinc.

Each kernel is a (k, k) float64 array over the integer grid centred on the middle tap and
normalised to sum to 1. Covariance: Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T, with
x the column offset and y the row offset. Random draws take an explicit np.random.Generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """(k, k) map of d^T Sigma^-1 d for the tap offsets d = (x, y)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be > 0, got ({sigma_x}, {sigma_y})")
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    x, y = np.meshgrid(ax, ax)  # x varies along columns, y along rows
    c, s = np.cos(theta), np.sin(theta)
    # Sigma^-1 = R diag(1/sx^2, 1/sy^2) R^T
    a, b = 1.0 / sigma_x**2, 1.0 / sigma_y**2
    i_xx = c * c * a + s * s * b
    i_yy = s * s * a + c * c * b
    i_xy = c * s * (a - b)
    return i_xx * x * x + 2.0 * i_xy * x * y + i_yy * y * y


def _normalise(kernel: np.ndarray) -> np.ndarray:
    return kernel / np.sum(kernel)


def anisotropic_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float
) -> np.ndarray:
    """Bivariate Gaussian exp(-q/2), q = d^T Sigma^-1 d."""
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def isotropic_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Rotation-symmetric Gaussian with standard deviation `sigma` pixels."""
    return anisotropic_gaussian_kernel(size, sigma, sigma, 0.0)


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Generalised Gaussian exp(-q^beta / 2): beta < 1 heavier tails, beta > 1 flatter top."""
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Plateau-shaped kernel 1 / (1 + q^beta)."""
    return _normalise(1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1.0))


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with cutoff omega_c = `cutoff` rad/pixel.

    The ideal disc response has impulse response omega_c J1(omega_c r) / (2 pi r), with the
    limit omega_c^2 / (4 pi) at r = 0; truncated to `size` taps, renormalised, and zero-padded
    to `pad_to` when larger.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    if not 0 < cutoff <= np.pi:
        raise ValueError(f"sinc cutoff must be in (0, pi], got {cutoff}")
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    r = np.hypot(*np.meshgrid(ax, ax))
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * r) / (2.0 * np.pi * r)
    kernel[r == 0] = cutoff**2 / (4.0 * np.pi)
    kernel = _normalise(kernel)
    return pad_kernel(kernel, pad_to) if pad_to > size else kernel


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an odd (k, k) kernel to (size, size) around its centre."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0 or (size - kernel.shape[0]) % 2:
        raise ValueError(f"cannot pad a {kernel.shape} kernel to {size}")
    return np.pad(kernel, pad) if pad else kernel


def pulse_kernel(size: int) -> np.ndarray:
    """The identity filter: one 1 in the centre of a (size, size) zero array."""
    kernel = np.zeros((size, size))
    kernel[size // 2, size // 2] = 1.0
    return kernel


def _draw_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # Reference: half the draws below 1 (heavier tails), half above (flatter top).
    if rng.random() < 0.5:
        return rng.uniform(beta_range[0], 1.0)
    return rng.uniform(1.0, beta_range[1])


def random_mixed_kernel(
    rng: np.random.Generator,
    size: int,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    rotation_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> np.ndarray:
    """One kernel of a type drawn from `kernel_list` with `kernel_prob`, random parameters."""
    kind = kernel_list[rng.choice(len(kernel_list), p=np.asarray(kernel_prob, np.float64))]
    sigma_x = rng.uniform(*sigma_range)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = rng.uniform(*sigma_range)
        theta = rng.uniform(*rotation_range)
    if kind in ("iso", "aniso"):
        return anisotropic_gaussian_kernel(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(
            size, sigma_x, sigma_y, theta, _draw_beta(rng, betag_range)
        )
    if kind.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, _draw_beta(rng, betap_range))
    raise ValueError(f"unknown kernel type {kind!r}")


def _kernel_sizes(size_range: Sequence[int]) -> np.ndarray:
    return np.arange(int(size_range[0]), int(size_range[1]) + 1, 2)


def random_blur_kernel(rng: np.random.Generator, cfg, stage: int = 1) -> np.ndarray:
    """Blur kernel of stage 1 or 2: sinc with prob sinc_prob, else a mixed kernel; padded."""
    suffix = "" if stage == 1 else "2"
    size = int(rng.choice(_kernel_sizes(cfg.kernel_size_range)))
    max_size = int(cfg.kernel_size_range[1])
    if rng.random() < getattr(cfg, "sinc_prob" + suffix):
        cutoffs = cfg.sinc_cutoff_range_small if size < 13 else cfg.sinc_cutoff_range
        kernel = sinc_kernel(size, rng.uniform(*cutoffs))
    else:
        kernel = random_mixed_kernel(
            rng,
            size,
            getattr(cfg, "kernel_list" + suffix),
            getattr(cfg, "kernel_prob" + suffix),
            getattr(cfg, "blur_sigma" + suffix),
            cfg.rotation_range,
            getattr(cfg, "betag_range" + suffix),
            getattr(cfg, "betap_range" + suffix),
        )
    return pad_kernel(kernel, max_size)


def random_final_sinc_kernel(rng: np.random.Generator, cfg) -> np.ndarray:
    """Final sinc filter with prob final_sinc_prob (fresh size, cutoff), else the identity."""
    max_size = int(cfg.kernel_size_range[1])
    if rng.random() < cfg.final_sinc_prob:
        size = int(rng.choice(_kernel_sizes(cfg.kernel_size_range)))
        return sinc_kernel(size, rng.uniform(*cfg.sinc_cutoff_range_small), pad_to=max_size)
    return pulse_kernel(max_size)
