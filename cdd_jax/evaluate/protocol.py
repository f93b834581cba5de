"""The full-image super-resolution protocol of SR papers (BasicSR's `calculate_psnr` /
`calculate_ssim`): 8-bit outputs, a border of `scale` pixels cropped, PSNR on RGB and on the Y
channel of ITU-R BT.601 YCbCr (Y = 16 + 65.481 R + 128.553 G + 24.966 B, R, G, B in [0, 1]),
SSIM on Y with an 11x11 Gaussian window (sigma 1.5) on the 0-255 scale, LPIPS on whole images.
Everything in float64 numpy."""

from __future__ import annotations

import numpy as np

PROTOCOL = ("8-bit RGB outputs; a border of `scale` px cropped from every side before PSNR/SSIM; "
            "PSNR on RGB and on Y of BT.601 YCbCr (16-235), data range 255; SSIM on Y with an "
            "11x11 Gaussian window (sigma 1.5, K1 = 0.01, K2 = 0.03); LPIPS on whole images in "
            "[-1, 1]")


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """Y of BT.601 YCbCr on the 0-255 scale (16-235) from uint8 (H, W, 3) RGB."""
    x = np.asarray(rgb, np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def crop_border(x: np.ndarray, border: int) -> np.ndarray:
    return x[border:-border, border:-border] if border > 0 else x


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0, data_range: float = 255.0) -> float:
    """PSNR in dB of two arrays on the same scale, after cropping `border` px."""
    a, b = crop_border(np.asarray(a, np.float64), border), crop_border(np.asarray(b, np.float64),
                                                                       border)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim_y(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM of the Y channels of two uint8 RGB images (Gaussian window, the protocol above)."""
    from skimage.metrics import structural_similarity

    ya, yb = crop_border(y_channel(a), border), crop_border(y_channel(b), border)
    return float(structural_similarity(ya, yb, data_range=255.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def image_metrics(sr: np.ndarray, hr: np.ndarray, scale: int, lpips=None) -> dict[str, float]:
    """{psnr, psnr_y, ssim_y[, lpips_<net>]} of a uint8 RGB output against the uint8 RGB ground
    truth (same size); `lpips`: an `evaluate.metrics.LPIPS`, a sequence of them, or None."""
    if sr.shape != hr.shape:
        raise ValueError(f"output {sr.shape} and ground truth {hr.shape} differ in size")
    out = {"psnr": psnr(sr, hr, scale), "psnr_y": psnr(y_channel(sr), y_channel(hr), scale),
           "ssim_y": ssim_y(sr, hr, scale)}
    to = lambda x: (np.asarray(x, np.float32)[None] / 127.5 - 1.0)
    for net in (() if lpips is None else lpips if isinstance(lpips, (list, tuple)) else (lpips,)):
        out[f"lpips_{net.net}"] = float(net(to(sr), to(hr))[0])
    return out


def summarise(per_image: list[dict]) -> list[dict]:
    """Rows {method, steps, metric, value (mean), stderr (std / sqrt(n)), n} over images, from
    per-image rows {image, method, steps, metric, value}."""
    groups: dict[tuple, list[float]] = {}
    for row in per_image:
        groups.setdefault((row["method"], row["steps"], row["metric"]), []).append(row["value"])
    rows = []
    for (method, steps, metric), values in groups.items():
        v = np.asarray(values, np.float64)
        stderr = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        rows.append({"method": method, "steps": steps, "metric": metric, "value": float(v.mean()),
                     "stderr": stderr, "n": len(v)})
    return rows
