"""Filtering, resizing, noise and quantisation on float32 HxWx3 images in [0, 1].

CPU equivalents of the reference's PyTorch ops (see shared/specs/degradation.md):
- filter2d: correlation with reflect-101 borders (cv2.filter2D == torch reflect pad + conv2d).
- resize "bilinear"/"bicubic": cv2.resize == F.interpolate(align_corners=False, antialias=False);
  with `scale` given, the source coordinate is (dst + 0.5) / scale - 0.5 as for F.interpolate's
  scale_factor, and the size is floor(src * scale).
- resize "area": adaptive average pooling (torch 'area'), NOT cv2.INTER_AREA.
"""

from __future__ import annotations

import functools
import itertools
import math

import cv2
import numpy as np

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
_CV2_MODES = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def _check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.dtype != np.float32:
        raise ValueError(f"expected a float32 HxWxC image, got {img.dtype} {img.shape}")


_DFT_MIN_TAPS = 130  # cv2.filter2D switches to a DFT for float32 kernels with >= 130 taps
_DFT_TILE = 200  # output tile side: one DFT block per tile (cv2 tiles >~236 px badly)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlates each channel with an odd (k, k) kernel, reflect-101 borders."""
    _check_image(img)
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"kernel must be odd and square, got {kernel.shape}")
    # Zero border taps contribute nothing whatever the padding: trim them (exactly equal, faster).
    nz = np.flatnonzero(np.any(kernel != 0, axis=0) | np.any(kernel != 0, axis=1))
    if nz.size:
        trim = min(nz[0], kernel.shape[0] - 1 - nz[-1])
        if trim:
            kernel = kernel[trim:-trim, trim:-trim]
    kernel = kernel.astype(np.float32)
    if kernel.shape == (1, 1):  # the identity (pulse) filter, up to a gain
        return img * kernel[0, 0]
    h, w = img.shape[:2]
    if kernel.size < _DFT_MIN_TAPS or max(h, w) <= _DFT_TILE:
        out = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        return out.reshape(img.shape)
    # Large kernel on a large image: pad once, then filter tiles that each fit one DFT block.
    r = kernel.shape[0] // 2
    padded = cv2.copyMakeBorder(img, r, r, r, r, cv2.BORDER_REFLECT_101).reshape(
        h + 2 * r, w + 2 * r, -1
    )
    out = np.empty_like(img)
    ys = np.linspace(0, h, -(-h // _DFT_TILE) + 1).round().astype(int)
    xs = np.linspace(0, w, -(-w // _DFT_TILE) + 1).round().astype(int)
    for y0, y1 in itertools.pairwise(ys):
        for x0, x1 in itertools.pairwise(xs):
            tile = cv2.filter2D(
                padded[y0 : y1 + 2 * r, x0 : x1 + 2 * r], -1, kernel, borderType=cv2.BORDER_CONSTANT
            ).reshape(y1 - y0 + 2 * r, x1 - x0 + 2 * r, -1)
            out[y0:y1, x0:x1] = tile[r : r + y1 - y0, r : r + x1 - x0]
    return out


@functools.lru_cache(maxsize=128)
def _pool_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive average pooling as T taps: out[i] = sum_t weight[t, i] * x[index[t, i]].

    Window i is [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)), weight 1 / its length.
    """
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    length = end - start
    t = np.arange(length.max())[:, None]
    index = np.minimum(start[None, :] + t, n_in - 1)
    weight = np.where(t < length[None, :], 1.0 / length[None, :], 0.0).astype(np.float32)
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def _area_axis(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Adaptive average pooling (torch 'area') of a float32 HxWxC image along axis 0 or 1."""
    if img.shape[axis] == n_out:
        return img
    index, weight = _pool_taps(img.shape[axis], n_out)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    out = None
    for idx, wt in zip(index, weight, strict=True):
        term = np.take(img, idx, axis=axis)
        term *= wt.reshape(shape)
        if out is None:
            out = term
        else:
            out += term
    return out


def resize(
    img: np.ndarray, size: tuple[int, int], mode: str, scale: float | None = None
) -> np.ndarray:
    """Resizes to size=(h, w) with mode area | bilinear | bicubic (float32 out, not clipped).

    `scale` (optional) reproduces F.interpolate(scale_factor=scale): size must then be
    floor(src * scale) and bilinear/bicubic sample at (dst + 0.5) / scale - 0.5.
    """
    _check_image(img)
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be >= 1x1, got {size}")
    if mode == "area":
        out = _area_axis(_area_axis(img, h, 0), w, 1)
        return out.astype(np.float32)
    if mode not in _CV2_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected area, bilinear or bicubic")
    if (h, w) == img.shape[:2] and (scale is None or scale == 1.0):
        return img.copy()
    interp = _CV2_MODES[mode]
    if scale is not None and min(img.shape[0], img.shape[1]) * scale >= 1:
        # OpenCV with fx = fy = scale maps coordinates exactly like torch's scale_factor but
        # rounds the output size; the first floor(n * scale) samples are the torch ones.
        out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=interp)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        if out.shape[0] >= h and out.shape[1] >= w:
            return np.ascontiguousarray(out[:h, :w])
    out = cv2.resize(img, (w, h), interpolation=interp)
    return out.reshape(h, w, -1)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """floor(side * scale) per side (at least 1): F.interpolate's size for a scale_factor."""
    return max(1, math.floor(size[0] * scale)), max(1, math.floor(size[1] * scale))


@functools.lru_cache(maxsize=32)
def _aa_cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) antialiased cubic (a = -0.5) resampling matrix, symmetric borders.

    The MATLAB imresize convention: source coordinate (dst + 0.5) / s - 0.5 and, when
    downsampling (s < 1), the kernel stretched by 1 / s.
    """
    s = n_out / n_in
    width = 4.0 / s if s < 1 else 4.0
    u = (np.arange(n_out) + 0.5) / s - 0.5
    left = np.floor(u - width / 2).astype(np.int64)
    taps = left[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]
    x = np.abs(u[:, None] - taps) * (s if s < 1 else 1.0)
    x2, x3 = x * x, x * x * x
    cubic = np.where(
        x <= 1,
        1.5 * x3 - 2.5 * x2 + 1,
        np.where(x <= 2, -0.5 * x3 + 2.5 * x2 - 4 * x + 2, 0.0),
    )
    cubic /= cubic.sum(axis=1, keepdims=True)
    idx = np.where(taps < 0, -taps - 1, taps)
    idx = np.where(idx >= n_in, 2 * n_in - 1 - idx, idx)
    idx = np.clip(idx, 0, n_in - 1)
    mat = np.zeros((n_out, n_in))
    np.add.at(mat, (np.repeat(np.arange(n_out), taps.shape[1]), idx.ravel()), cubic.ravel())
    mat.setflags(write=False)
    return mat


def resize_aa_bicubic(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize (MATLAB imresize style), the classic bicubic-SR downsampler."""
    _check_image(img)
    h, w = size
    mh = _aa_cubic_matrix(img.shape[0], h).astype(np.float32)
    mw = _aa_cubic_matrix(img.shape[1], w).astype(np.float32)
    c = img.shape[2]
    tmp = (mh @ img.reshape(img.shape[0], -1)).reshape(h, img.shape[1], c)
    return np.ascontiguousarray(np.einsum("wx,hxc->hwc", mw, tmp, optimize=True))


def add_gaussian_noise(
    img: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool = False
) -> np.ndarray:
    """img + N(0, (sigma / 255)^2), one field for all channels if `gray`; clipped to [0, 1].

    `sigma` is in 8-bit units, as in the reference.
    """
    _check_image(img)
    shape = img.shape[:2] + (1,) if gray else img.shape
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0)


def poisson_noise(img: np.ndarray, rng: np.random.Generator, vals: str = "unique") -> np.ndarray:
    """Zero-mean shot noise Poisson(q * V) / V - q of the 8-bit quantised image q.

    V = 2^ceil(log2(number of distinct 8-bit values)) ("unique", the reference) or 256
    ("fixed256"). E[noise] = 0 and Var[noise] = q / V per pixel.
    """
    q8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if vals == "unique":
        levels = np.count_nonzero(np.bincount(q8.ravel(), minlength=256))
        v = 2.0 ** math.ceil(math.log2(levels)) if levels > 1 else 1.0
    elif vals == "fixed256":
        v = 256.0
    else:
        raise ValueError(f"unknown poisson_vals {vals!r}; expected 'unique' or 'fixed256'")
    q = q8.astype(np.float64) / 255.0
    return (rng.poisson(q * v) / v - q).astype(np.float32)


def add_poisson_noise(
    img: np.ndarray,
    rng: np.random.Generator,
    scale: float,
    gray: bool = False,
    vals: str = "unique",
) -> np.ndarray:
    """img + scale * Poisson shot noise (of the luma if `gray`, shared by channels); clipped."""
    _check_image(img)
    if gray:
        luma = cv2.transform(img, np.asarray([GRAY_WEIGHTS], np.float32))
        noise = poisson_noise(luma.reshape(img.shape[0], img.shape[1], 1), rng, vals)
    else:
        noise = poisson_noise(img, rng, vals)
    noise *= np.float32(scale)
    return np.clip(img + noise, 0.0, 1.0)


def quantize(img: np.ndarray) -> np.ndarray:
    """clip(round(255 x), 0, 255) / 255 as float32: the 8-bit grid the reference ends on."""
    return (np.clip(np.rint(img * np.float32(255.0)), 0, 255) / np.float32(255.0)).astype(
        np.float32
    )
