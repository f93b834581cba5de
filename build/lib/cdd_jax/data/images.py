"""Robust image decoding and conversion to uint8 HxWx3 RGB, plus padding of small images.

Every source in `cdd_jax.data` returns images in one form: a C-contiguous uint8 array of shape
(H, W, 3) in RGB order. This module converts whatever a file or a TFDS feature holds into that form:

- greyscale (H, W) or (H, W, 1): replicated to three channels;
- grey + alpha (H, W, 2) and RGBA (H, W, 4): composited over WHITE, out = a * rgb + (1 - a) * 255.
  Dropping alpha instead would expose whatever colour the encoder left under fully transparent
  pixels (often black or noise); white is what viewers show for such images;
- uint16 (16-bit PNG/TIFF): scaled to 8 bits by x * 255 / 65535, rounded to nearest;
- float: assumed in [0, 1], clipped, scaled by 255 and rounded;
- bool: False -> 0, True -> 255.

Decoding from files uses PIL and respects the EXIF orientation tag.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# Training data are trusted local files; allow large photos (up to 1 gigapixel) without PIL's
# decompression-bomb error (its default limit is ~179 megapixels).
_MAX_PIXELS = 1 << 30

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composites float rgb in [0, 1] (H, W, 3) with alpha in [0, 1] (H, W, 1) over white."""
    return rgb * alpha + (1.0 - alpha)


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """Maps an image array of a supported dtype to float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("image contains NaN or infinite values")
        return np.clip(array.astype(np.float32), 0.0, 1.0)
    raise TypeError(
        f"unsupported image dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1]"
    )


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Converts an image array (grey, grey+alpha, RGB, RGBA; uint8/uint16/bool/float) to uint8 RGB.

    Returns a C-contiguous array of shape (H, W, 3). See the module docstring for the rules.
    Raises ValueError for shapes that are not images and TypeError for unsupported dtypes.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, C) with C in 1..4; got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size: shape {array.shape}")
    channels = array.shape[-1]
    if array.dtype == np.uint8 and channels == 3:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint8 and channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=-1))
    x = _to_unit_float(array)
    if channels in (2, 4):
        colour, alpha = x[..., :-1], x[..., -1:]
        if colour.shape[-1] == 1:
            colour = np.repeat(colour, 3, axis=-1)
        x = _composite_on_white(colour, alpha)
    elif channels == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(np.round(x * 255.0).astype(np.uint8))


def pil_to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Converts a decoded PIL image of any mode to uint8 RGB, honouring EXIF orientation."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("RGB", "L", "RGBA", "LA"):
        return to_rgb_uint8(np.asarray(img))
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (PIL reports "I;16*" or, for some files, 32-bit "I" holding 0..65535).
        arr = np.asarray(img)
        if arr.dtype != np.uint16:
            arr = np.clip(arr.astype(np.int64), 0, 65535).astype(np.uint16)
        return to_rgb_uint8(arr)
    if mode == "F":
        return to_rgb_uint8(np.asarray(img, dtype=np.float32))
    if mode == "1":
        return to_rgb_uint8(np.asarray(img.convert("L")))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return to_rgb_uint8(np.asarray(img.convert("RGBA" if has_alpha else "RGB")))
    # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La, ...: let PIL do the colour conversion.
    if mode.endswith("A") or mode.endswith("a"):
        return to_rgb_uint8(np.asarray(img.convert("RGBA")))
    return to_rgb_uint8(np.asarray(img.convert("RGB")))


def _open(path_or_bytes: str | os.PathLike | bytes) -> Image.Image:
    if isinstance(path_or_bytes, bytes):
        return Image.open(io.BytesIO(path_or_bytes))
    return Image.open(path_or_bytes)


def decode_image(path_or_bytes: str | os.PathLike | bytes) -> np.ndarray:
    """Decodes an image file (or its bytes) to uint8 RGB (H, W, 3).

    Raises ValueError naming the file if it cannot be decoded.
    """
    name = "<bytes>" if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(path_or_bytes) as img:
                img.load()
                return pil_to_rgb_uint8(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {name!r}: {e}") from e


def check_image_header(path: str | os.PathLike) -> str | None:
    """Cheap validity check of an image file without decoding its pixels.

    Returns None if PIL recognises the file as a non-empty image and its structure verifies, else
    a short reason. PNG verification checks every chunk's CRC; JPEG verification only parses the
    markers, so a truncated JPEG body can still pass and fail later at decode time.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                img.verify()
        if width <= 0 or height <= 0:
            return f"zero-size image {width}x{height}"
    except Exception as e:  # PIL raises many types for malformed files.
        return f"{type(e).__name__}: {e}"
    return None


def pad_to_min_size(image: np.ndarray, min_height: int, min_width: int) -> np.ndarray:
    """Pads an (H, W, C) image symmetrically up to at least (min_height, min_width).

    Reflect padding (mirror without repeating the edge pixel) keeps local image statistics
    natural; an axis of length 1 cannot be reflected and is edge-padded instead. Images already
    large enough are returned unchanged.
    """
    h, w = image.shape[:2]
    pad_h, pad_w = max(0, min_height - h), max(0, min_width - w)
    if pad_h == 0 and pad_w == 0:
        return image
    out = image
    for axis, (size, pad) in enumerate(((h, pad_h), (w, pad_w))):
        if pad == 0:
            continue
        widths = [(0, 0)] * image.ndim
        widths[axis] = (pad // 2, pad - pad // 2)
        out = np.pad(out, widths, mode="reflect" if size > 1 else "edge")
    return out
