"""Image files in and out for the upscaler: PNG, JPEG, WebP, BMP, TIFF; 8 and 16 bits; grey,
grey + alpha, RGB, RGBA; EXIF orientation applied on reading.

Pixel values are taken as sRGB: an embedded ICC profile is not applied (and not copied to the
output). Outputs are written atomically (a temporary file in the same folder, then `os.replace`):
an interrupted run never leaves a half-written image under the output name.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
              ".tif": "TIFF", ".tiff": "TIFF"}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """An input that cannot be upscaled (the message is the one-line reason)."""


def _raw_16bit_colour(im: Image.Image) -> bool:
    """PIL decodes 16-bit RGB(A) PNG/TIFF to 8 bits; such files are read with OpenCV."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in im.tile or ():
        args = tile.args if hasattr(tile, "args") else tile[3]
        raw = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _why_unidentified(path: str) -> str:
    """The reason PIL could not identify a file: empty, a PNG of zero size, or unknown."""
    with open(path, "rb") as f:
        head = f.read(24)
    if not head:
        return "empty file (0 bytes)"
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w == 0 or h == 0:
            return f"zero-sized image ({w}x{h})"
    return "not an image file this reader knows (PNG, JPEG, WebP, BMP, TIFF)"


def _orient_array(array: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation (1-8) applied to an (H, W[, C]) array, as PIL's exif_transpose does."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1]}
    return np.ascontiguousarray(ops[orientation](array)) if orientation in ops else array


def _read_16bit_colour(path: str, orientation: int) -> np.ndarray:
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise ImageError("cannot decode this 16-bit colour image")
    code = cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return _orient_array(cv2.cvtColor(array, code), orientation)


def _to_array(im: Image.Image) -> np.ndarray:
    """uint8 / uint16 (H, W) or (H, W, 2|3|4) of a loaded PIL image."""
    if im.mode in _GREY16:
        return np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
    if im.mode == "F":
        raise ImageError("floating-point images are not supported")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode in ("1",):
        im = im.convert("L")
    elif im.mode in ("La",):
        im = im.convert("LA")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode or im.mode == "RGBa" else "RGB")
    return np.asarray(im)


def read_image(path: str, max_pixels: int = 0) -> tuple[np.ndarray, str]:
    """(uint8 / uint16 array, PIL format name) of an image file, EXIF orientation applied.

    Raises ImageError (or OSError) with a one-line reason: unreadable or truncated file,
    zero-sized image, more than `max_pixels` pixels (0: no limit; checked before decoding).
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w == 0 or h == 0:
                raise ImageError(f"zero-sized image ({w}x{h})")
            if max_pixels and w * h > max_pixels:
                raise ImageError(f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                                 "(--max_pixels)")
            fmt = im.format or "PNG"
            colour16 = _raw_16bit_colour(im)  # Before getexif, which may decode a PNG.
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            if colour16:
                return _read_16bit_colour(path, orientation), fmt
            im.load()
            return _to_array(ImageOps.exif_transpose(im) if orientation != 1 else im), fmt
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels for PIL's safety limit ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(_why_unidentified(path)) from e
    except (OSError, SyntaxError) as e:
        raise ImageError(f"unreadable or truncated image file ({e})") from e


def output_format(input_format: str, array: np.ndarray, keep_format: bool) -> str:
    """PNG, or with `keep_format` the input's format where it can hold the result (16 bits:
    PNG/TIFF only; alpha: not JPEG/BMP); otherwise PNG."""
    if not keep_format or input_format not in SUFFIX:
        return "PNG"
    has_alpha = array.ndim == 3 and array.shape[2] in (2, 4)
    if array.dtype == np.uint16 and input_format not in ("PNG", "TIFF"):
        return "PNG"
    if has_alpha and input_format in ("JPEG", "BMP"):
        return "PNG"
    return input_format


def encode(array: np.ndarray, fmt: str) -> bytes:
    """The file bytes of `array` in format `fmt` (JPEG/WebP at quality 95)."""
    if array.dtype == np.uint16:  # PIL cannot write 16-bit colour; OpenCV writes all of them.
        if array.ndim == 3 and array.shape[2] in (3, 4):
            code = cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR
            array = cv2.cvtColor(array, code)
        elif array.ndim == 3 and array.shape[2] == 2:
            raise ImageError("16-bit grey + alpha output is not supported")
        ok, buf = cv2.imencode(SUFFIX[fmt], array)
        if not ok:
            raise ImageError(f"cannot encode a 16-bit image as {fmt}")
        return buf.tobytes()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    out = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(np.ascontiguousarray(array)).save(out, format=fmt, **options)
    return out.getvalue()
