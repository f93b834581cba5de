"""Degradation settings: presets (realesrgan, stablesr, bicubic) and their validation.

Field names follow the Real-ESRGAN option files (resize_prob, noise_range, jpeg_range, ... with a
trailing 2 for the second stage) so a reader can check them against the reference line by line.
Every range is a (min, max) pair drawn uniformly; every probability list sums to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

from cdd_jax import config_checks as checks

PRESETS = ("realesrgan", "stablesr", "bicubic")
CHAINS = ("second_order", "downsample")
KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")
LQ_DOWN_MODES = ("bicubic_aa", "bicubic", "bilinear", "area")
JPEG_IMPLS = ("fast", "diffjpeg")
POISSON_VALS = ("unique", "fixed256")


def degradation_config(preset: str = "realesrgan") -> ml_collections.ConfigDict:
    """Returns the degradation section of the config for `preset` (locked: typos are errors)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown degradation preset {preset!r}; expected one of {PRESETS}")
    c = ml_collections.ConfigDict()
    # Name of the preset these values came from (informational; validated).
    c.preset = preset
    # "second_order": the Real-ESRGAN chain; "downsample": GT only downsampled by `scale`.
    c.chain = "second_order"
    # Super-resolution factor: lq side = gt side / scale.
    c.scale = 4
    # Side of the GT crop the degradation runs on before the paired crop (reference crop_pad_size
    # 400 with a 256 training crop); 0 = the training crop size itself (cheapest).
    c.degrade_size = 400
    # Probability of a horizontal flip of the source image.
    c.flip_prob = 0.5
    # Probability of a random permutation of the GT crop's colour channels (an augmentation, not
    # part of Real-ESRGAN; 0 = off, and then no random number is drawn for it). With few training
    # photos it keeps a restoration from learning their colour statistics.
    c.channel_shuffle_prob = 0.0
    # Unsharp-mask the GT crop; the sharpened GT is both the degradation input and the target.
    c.use_sharpen = True
    # USM Gaussian kernel side (odd; sigma follows OpenCV's rule: 8.0 for 51).
    c.usm_radius = 51
    # USM residual weight: sharp = clip(img + weight * (img - blur)).
    c.usm_weight = 0.5
    # USM threshold on |img - blur| in 8-bit units for the (then blurred) mask.
    c.usm_threshold = 10.0
    # JPEG implementation: "fast" (libjpeg via OpenCV, integer quality) or "diffjpeg" (the
    # reference's differentiable-JPEG arithmetic in NumPy, continuous quality).
    c.jpeg_impl = "fast"
    # Poisson levels: "unique" = 2**ceil(log2(#distinct 8-bit values)) (reference);
    # "fixed256" = always 256 (approximation, skips the histogram).
    c.poisson_vals = "unique"
    # Downsampling of the "downsample" chain: bicubic_aa (antialiased, MATLAB imresize style),
    # bicubic / bilinear (OpenCV, no antialiasing), area (adaptive average pooling).
    c.lq_down = "bicubic_aa"
    # Interpolation modes the random resizes pick from uniformly.
    c.resize_modes = RESIZE_MODES

    # ---- blur kernels ----
    # Kernel side range; odd sides in [min, max] drawn uniformly, zero-padded to max.
    c.kernel_size_range = (7, 21)
    # Kernel rotation range (radians) of anisotropic kernels.
    c.rotation_range = (-math.pi, math.pi)
    # Sinc cutoff omega_c range for kernel sides >= 13 (first and second blur).
    c.sinc_cutoff_range = (math.pi / 5, math.pi)
    # Sinc cutoff omega_c range for kernel sides < 13 (and the final sinc filter).
    c.sinc_cutoff_range_small = (math.pi / 3, math.pi)
    # First blur: kernel types and their probabilities (sum to 1).
    c.kernel_list = KERNEL_TYPES
    c.kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    # First blur: probability of a sinc kernel instead of a kernel from kernel_list.
    c.sinc_prob = 0.1
    # First blur: sigma_x, sigma_y range (pixels).
    c.blur_sigma = (0.2, 3.0)
    # First blur: generalized-Gaussian beta; half the draws in [min, 1], half in [1, max].
    c.betag_range = (0.5, 4.0)
    # First blur: plateau beta; half the draws in [min, 1], half in [1, max].
    c.betap_range = (1.0, 2.0)
    # Second blur: same fields for the second stage.
    c.kernel_list2 = KERNEL_TYPES
    c.kernel_prob2 = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    c.sinc_prob2 = 0.1
    c.blur_sigma2 = (0.2, 1.5)
    c.betag_range2 = (0.5, 4.0)
    c.betap_range2 = (1.0, 2.0)
    # Probability of the final sinc filter (else identity).
    c.final_sinc_prob = 0.8

    # ---- first stage ----
    # Resize up / down / keep probabilities (sum to 1).
    c.resize_prob = (0.2, 0.7, 0.1)
    # Resize scale range: down draws U(min, 1), up draws U(1, max).
    c.resize_range = (0.15, 1.5)
    # Probability of Gaussian noise (else Poisson).
    c.gaussian_noise_prob = 0.5
    # Gaussian noise sigma range in 8-bit units.
    c.noise_range = (1.0, 30.0)
    # Poisson noise scale range.
    c.poisson_scale_range = (0.05, 3.0)
    # Probability that the noise is grey (one field shared by R, G, B).
    c.gray_noise_prob = 0.4
    # JPEG quality range.
    c.jpeg_range = (30.0, 95.0)

    # ---- second stage ----
    # Probability of the second blur.
    c.second_blur_prob = 0.8
    c.resize_prob2 = (0.3, 0.4, 0.3)
    # Scale relative to the final lq size: output side int(gt / scale * s).
    c.resize_range2 = (0.3, 1.2)
    c.gaussian_noise_prob2 = 0.5
    c.noise_range2 = (1.0, 25.0)
    c.poisson_scale_range2 = (0.05, 2.5)
    c.gray_noise_prob2 = 0.4
    c.jpeg_range2 = (30.0, 95.0)
    # Probability of the final order [resize, sinc, JPEG] (else [JPEG, resize, sinc]).
    c.final_resize_first_prob = 0.5

    if preset == "stablesr":
        # StableSR: milder ranges, degradation directly on the (512) training crop.
        c.degrade_size = 0
        c.blur_sigma = (0.2, 1.5)
        c.blur_sigma2 = (0.2, 1.0)
        c.resize_range = (0.3, 1.5)
        c.noise_range = (1.0, 15.0)
        c.poisson_scale_range = (0.05, 2.0)
        c.jpeg_range = (60.0, 95.0)
        c.second_blur_prob = 0.5
        c.resize_range2 = (0.6, 1.2)
        c.noise_range2 = (1.0, 12.0)
        c.poisson_scale_range2 = (0.05, 1.0)
        c.jpeg_range2 = (60.0, 100.0)
    elif preset == "bicubic":
        # Classic clean SR: lq = GT downsampled by `scale`, no blur, noise, JPEG or sharpening.
        c.chain = "downsample"
        c.degrade_size = 0
        c.use_sharpen = False
    c.lock()
    return c


_RANGES = (
    "kernel_size_range",
    "rotation_range",
    "sinc_cutoff_range",
    "sinc_cutoff_range_small",
    "blur_sigma",
    "betag_range",
    "betap_range",
    "blur_sigma2",
    "betag_range2",
    "betap_range2",
    "resize_range",
    "noise_range",
    "poisson_scale_range",
    "jpeg_range",
    "resize_range2",
    "noise_range2",
    "poisson_scale_range2",
    "jpeg_range2",
)
_PROBS = (
    "flip_prob",
    "channel_shuffle_prob",
    "sinc_prob",
    "sinc_prob2",
    "final_sinc_prob",
    "gaussian_noise_prob",
    "gray_noise_prob",
    "second_blur_prob",
    "gaussian_noise_prob2",
    "gray_noise_prob2",
    "final_resize_first_prob",
)


def _range(cfg, name: str) -> tuple[float, float]:
    value = cfg[name]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"degradation.{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"degradation.{name} must be finite, got {value!r}")
    if lo > hi:
        raise ValueError(f"degradation.{name}: min {lo} > max {hi}")
    return lo, hi


def _distribution(cfg, name: str, size: int) -> None:
    probs = cfg[name]
    if len(probs) != size:
        raise ValueError(f"degradation.{name} needs {size} probabilities, got {probs!r}")
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"degradation.{name} must be >= 0 and sum to 1, got {probs!r}")


def validate_degradation_config(cfg: ml_collections.ConfigDict, crop_size: int) -> None:
    """Raises ValueError (naming the field and values) for any inconsistent setting.

    Called where the config is read, before any grain worker starts, so a bad value fails once
    and clearly instead of inside a worker process.
    """
    checks.check_keys(cfg, degradation_config("realesrgan"), "degradation.")
    for name, valid in (("preset", PRESETS), ("chain", CHAINS), ("jpeg_impl", JPEG_IMPLS),
                        ("poisson_vals", POISSON_VALS), ("lq_down", LQ_DOWN_MODES)):
        checks.choice(cfg, name, valid, prefix="degradation.")
    if not cfg.resize_modes or any(m not in RESIZE_MODES for m in cfg.resize_modes):
        raise ValueError(
            f"degradation.resize_modes={cfg.resize_modes!r}: each must be one of {RESIZE_MODES}"
        )
    for name in ("kernel_list", "kernel_list2"):
        if not cfg[name] or any(k not in KERNEL_TYPES for k in cfg[name]):
            raise ValueError(f"degradation.{name}={cfg[name]!r}: each must be in {KERNEL_TYPES}")
    _distribution(cfg, "kernel_prob", len(cfg.kernel_list))
    _distribution(cfg, "kernel_prob2", len(cfg.kernel_list2))
    _distribution(cfg, "resize_prob", 3)
    _distribution(cfg, "resize_prob2", 3)
    for name in _PROBS:
        checks.number(cfg, name, 0, 1, prefix="degradation.")
    ranges = {name: _range(cfg, name) for name in _RANGES}

    k_lo, k_hi = ranges["kernel_size_range"]
    if k_lo < 1 or int(k_lo) != k_lo or int(k_hi) != k_hi or k_lo % 2 == 0 or k_hi % 2 == 0:
        raise ValueError(
            f"degradation.kernel_size_range={cfg.kernel_size_range!r} must be odd integers >= 1"
        )
    positive = ("blur_sigma", "blur_sigma2", "resize_range", "resize_range2")
    positive += ("sinc_cutoff_range", "sinc_cutoff_range_small")
    for name in positive:
        if ranges[name][0] <= 0:
            raise ValueError(f"degradation.{name}={cfg[name]!r} must be > 0")
    for name in ("resize_range", "resize_range2"):
        lo, hi = ranges[name]
        if not lo <= 1.0 <= hi:
            raise ValueError(f"degradation.{name}={cfg[name]!r} must contain 1 (down <= 1 <= up)")
    for name in ("betag_range", "betap_range", "betag_range2", "betap_range2"):
        lo, hi = ranges[name]
        if lo <= 0 or not lo <= 1.0 <= hi:
            raise ValueError(f"degradation.{name}={cfg[name]!r} must satisfy 0 < min <= 1 <= max")
    for name in ("noise_range", "noise_range2", "poisson_scale_range", "poisson_scale_range2"):
        if ranges[name][0] < 0:
            raise ValueError(f"degradation.{name}={cfg[name]!r} must be >= 0")
    for name in ("jpeg_range", "jpeg_range2"):
        lo, hi = ranges[name]
        if lo < 1 or hi > 100:
            raise ValueError(f"degradation.{name}={cfg[name]!r} must lie in [1, 100]")
    if cfg.usm_radius < 1:
        raise ValueError(f"degradation.usm_radius={cfg.usm_radius!r} must be >= 1")

    checks.number(cfg, "scale", 1, integer=True, prefix="degradation.")
    checks.number(cfg, "degrade_size", 0, integer=True, prefix="degradation.")
    scale = cfg.scale
    if not isinstance(crop_size, int) or crop_size < 1:
        raise ValueError(f"crop_size={crop_size!r} must be a positive integer")
    if crop_size % scale:
        raise ValueError(f"crop_size={crop_size} is not divisible by degradation.scale={scale}")
    size = cfg.degrade_size
    if size:
        if size % scale:
            raise ValueError(
                f"degradation.degrade_size={size} is not divisible by degradation.scale={scale}"
            )
        if crop_size > size:
            raise ValueError(
                f"crop_size={crop_size} is larger than the padded degradation crop "
                f"degradation.degrade_size={size}; raise degrade_size or set it to 0"
            )
