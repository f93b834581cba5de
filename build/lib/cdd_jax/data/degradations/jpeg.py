"""JPEG compression of float32 RGB images in [0, 1], two ways.

- `jpeg_diff`: the reference's differentiable-JPEG (DiffJPEG) arithmetic in NumPy float32:
  continuous quality, quality factor f = 50/q (q < 50) or (200 - 2q)/100 applied to the
  standard tables in float without rounding or clamping, the luma table transposed (as in the
  reference), zero padding to a multiple of 16, 4:2:0 chroma by 2x2 mean, nearest chroma
  upsampling, hard rounding of the coefficients, output clamped (not rounded).
- `jpeg_fast`: libjpeg through OpenCV (integer quality, 8-bit in and out, 4:2:0); 0.5-1 dB
  cleaner than DiffJPEG at the same quality and several times faster.
"""

from __future__ import annotations

import cv2
import numpy as np

# Standard JPEG tables (ITU-T T.81 Annex K), row = vertical frequency.
LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)
CHROMA_TABLE = np.full((8, 8), 99, dtype=np.float32)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

# DiffJPEG divides luma coefficient (u, v) by LUMA_TABLE[v, u]; the chroma table is symmetric.
DIFFJPEG_LUMA_TABLE = np.ascontiguousarray(LUMA_TABLE.T)

_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
    dtype=np.float32,
)
_YCC_TO_RGB = np.array(
    [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float32
)
_YCC_SHIFT = np.array([0.0, 128.0, 128.0], dtype=np.float32)
# The same maps as 3x4 affine matrices for cv2.transform: ycc = M rgb + shift and its inverse.
_RGB_TO_YCC_AFFINE = np.concatenate([_RGB_TO_YCC, _YCC_SHIFT[:, None]], axis=1)
_YCC_TO_RGB_AFFINE = np.concatenate([_YCC_TO_RGB, -(_YCC_TO_RGB @ _YCC_SHIFT)[:, None]], axis=1)


def _dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II: D[u, i] = c(u)/2 cos((2i + 1) u pi / 16), c(0) = 1/sqrt 2."""
    u, i = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    d = 0.5 * np.cos((2 * i + 1) * u * np.pi / 16)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


_DCT = _dct_matrix()


def quality_factor(quality: float) -> float:
    """DiffJPEG's table multiplier for a (continuous) quality in [1, 100]."""
    if quality < 50:
        return 50.0 / quality
    return (200.0 - 2.0 * quality) / 100.0


def _blocks_roundtrip(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """DCT, quantise (hard rounding), dequantise, inverse DCT of every 8x8 block of a plane."""
    h, w = plane.shape
    x = (plane - np.float32(128.0)).reshape(h // 8, 8, w)
    coef = (_DCT @ x).reshape(h // 8, 8, w // 8, 8) @ _DCT.T  # coef[a, u, b, v]
    t = table[None, :, None, :]
    coef = np.round(coef / t) * t
    x = (_DCT.T @ coef.reshape(h // 8, 8, w)).reshape(h // 8, 8, w // 8, 8) @ _DCT
    return x.reshape(h, w) + np.float32(128.0)


def jpeg_diff(img: np.ndarray, quality: float) -> np.ndarray:
    """DiffJPEG-faithful JPEG round trip of a float32 HxWx3 image in [0, 1] (float32 out)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"jpeg_diff expects an HxWx3 image, got {img.shape}")
    if not 0 < quality <= 100:
        raise ValueError(f"JPEG quality must be in (0, 100], got {quality}")
    h, w = img.shape[:2]
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16
    x = np.zeros((hp, wp, 3), np.float32)
    np.multiply(img, np.float32(255.0), out=x[:h, :w])
    y, cb, cr = cv2.split(cv2.transform(x, _RGB_TO_YCC_AFFINE))
    factor = np.float32(quality_factor(quality))
    if factor > 0:  # quality 100: the tables vanish and quantisation is the identity
        y = _blocks_roundtrip(y, DIFFJPEG_LUMA_TABLE * factor)
    chroma = []
    for c in (cb, cr):
        # 4:2:0: 2x2 means (INTER_AREA at an integer factor), nearest upsampling back
        c = cv2.resize(c, (wp // 2, hp // 2), interpolation=cv2.INTER_AREA)
        if factor > 0:
            c = _blocks_roundtrip(c, CHROMA_TABLE * factor)
        chroma.append(cv2.resize(c, (wp, hp), interpolation=cv2.INTER_NEAREST))
    rgb = cv2.transform(cv2.merge([y, *chroma]), _YCC_TO_RGB_AFFINE)[:h, :w]
    return np.clip(rgb, 0.0, 255.0) / np.float32(255.0)


def jpeg_fast(img: np.ndarray, quality: float) -> np.ndarray:
    """libjpeg round trip (OpenCV) at integer quality round(quality); float32 on the 1/255 grid."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"jpeg_fast expects an HxWx3 image, got {img.shape}")
    q = int(np.clip(np.rint(quality), 1, 100))
    u8 = np.clip(np.rint(img * np.float32(255.0)), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(u8, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for an image of shape {img.shape}")
    rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32) / np.float32(255.0)
