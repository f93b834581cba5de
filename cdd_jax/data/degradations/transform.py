"""The second-order degradation chain and the grain transform that makes (gt, lq, cond) pairs.

Every random draw comes from the np.random.Generator passed in. MapDataset.random_map derives
that generator from (seed, record index), so a pair depends on the seed and the index only: not
on the number of grain workers, nor on which host reads it (apply random_map before slicing
the dataset per host).
"""

from __future__ import annotations

import copy
import types

import cv2
import grain
import ml_collections
import numpy as np

from cdd_jax.data.degradations import config as config_lib
from cdd_jax.data.degradations import kernels, ops
from cdd_jax.data.degradations.jpeg import jpeg_diff, jpeg_fast
from cdd_jax.data.degradations.usm import usm_sharpen

_UP_DOWN_KEEP = ("up", "down", "keep")


def _settings(cfg) -> types.SimpleNamespace:
    """A plain, picklable, immutable-by-convention copy of the config (lists -> tuples)."""
    if isinstance(cfg, types.SimpleNamespace):
        return cfg
    values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    return types.SimpleNamespace(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    )


def _random_scale(rng: np.random.Generator, probs, scale_range) -> float:
    kind = _UP_DOWN_KEEP[rng.choice(3, p=np.asarray(probs, np.float64))]
    if kind == "up":
        return rng.uniform(1.0, scale_range[1])
    if kind == "down":
        return rng.uniform(scale_range[0], 1.0)
    return 1.0


def _random_mode(rng: np.random.Generator, cfg) -> str:
    return cfg.resize_modes[rng.integers(len(cfg.resize_modes))]


def _random_noise(
    img: np.ndarray, rng: np.random.Generator, cfg, gauss_p, sigma_range, poisson_range, gray_p
) -> np.ndarray:
    if rng.random() < gauss_p:
        sigma = rng.uniform(*sigma_range)
        gray = rng.random() < gray_p
        return ops.add_gaussian_noise(img, rng, sigma, gray)
    scale = rng.uniform(*poisson_range)
    gray = rng.random() < gray_p
    return ops.add_poisson_noise(img, rng, scale, gray, cfg.poisson_vals)


def _jpeg(img: np.ndarray, rng: np.random.Generator, cfg, quality_range) -> np.ndarray:
    quality = rng.uniform(*quality_range)
    img = np.clip(img, 0.0, 1.0)
    return jpeg_fast(img, quality) if cfg.jpeg_impl == "fast" else jpeg_diff(img, quality)


def degrade(gt: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """Degrades a float32 HxWx3 GT in [0, 1] to lq of (H // scale, W // scale) on the 1/255 grid.

    chain "second_order" (Real-ESRGAN): blur -> random resize -> noise -> JPEG -> (blur) ->
    random resize -> noise -> {[resize, sinc, JPEG] or [JPEG, resize, sinc]} -> 8-bit quantise.
    chain "downsample": resize by 1 / scale with `lq_down`, quantise.
    """
    cfg = _settings(cfg)
    if gt.ndim != 3 or gt.shape[2] != 3 or gt.dtype != np.float32:
        raise ValueError(f"degrade expects a float32 HxWx3 image, got {gt.dtype} {gt.shape}")
    h, w = gt.shape[:2]
    out_size = (max(1, h // cfg.scale), max(1, w // cfg.scale))
    if cfg.chain == "downsample":
        if cfg.lq_down == "bicubic_aa":
            return ops.quantize(ops.resize_aa_bicubic(gt, out_size))
        return ops.quantize(ops.resize(gt, out_size, cfg.lq_down))

    kernel1 = kernels.random_blur_kernel(rng, cfg, stage=1)
    kernel2 = kernels.random_blur_kernel(rng, cfg, stage=2)
    sinc = kernels.random_final_sinc_kernel(rng, cfg)

    # First stage.
    out = ops.filter2d(gt, kernel1)
    s = _random_scale(rng, cfg.resize_prob, cfg.resize_range)
    out = ops.resize(out, ops.scaled_size((h, w), s), _random_mode(rng, cfg), scale=s)
    out = _random_noise(
        out,
        rng,
        cfg,
        cfg.gaussian_noise_prob,
        cfg.noise_range,
        cfg.poisson_scale_range,
        cfg.gray_noise_prob,
    )
    out = _jpeg(out, rng, cfg, cfg.jpeg_range)

    # Second stage.
    if rng.random() < cfg.second_blur_prob:
        out = ops.filter2d(out, kernel2)
    s = _random_scale(rng, cfg.resize_prob2, cfg.resize_range2)
    size2 = (max(1, int(h / cfg.scale * s)), max(1, int(w / cfg.scale * s)))
    out = ops.resize(out, size2, _random_mode(rng, cfg))
    out = _random_noise(
        out,
        rng,
        cfg,
        cfg.gaussian_noise_prob2,
        cfg.noise_range2,
        cfg.poisson_scale_range2,
        cfg.gray_noise_prob2,
    )

    # Final stage: resize back + sinc and JPEG, in a random order.
    if rng.random() < cfg.final_resize_first_prob:
        out = ops.filter2d(ops.resize(out, out_size, _random_mode(rng, cfg)), sinc)
        out = _jpeg(out, rng, cfg, cfg.jpeg_range2)
    else:
        out = _jpeg(out, rng, cfg, cfg.jpeg_range2)
        out = ops.filter2d(ops.resize(out, out_size, _random_mode(rng, cfg)), sinc)
    return ops.quantize(out)


_SINGLE_THREADED = False


def _single_threaded() -> None:
    """One OpenCV and one BLAS thread per process: grain runs one process per core, and
    OpenCV's or OpenBLAS's own threads would fight those workers (OpenBLAS's spinning threads
    made a 64x256 @ 256x768 matmul 30x slower on a busy 2-core machine). Set once, lazily, in
    whichever process runs the transform."""
    global _SINGLE_THREADED
    if not _SINGLE_THREADED:
        cv2.setNumThreads(1)
        try:
            import threadpoolctl

            threadpoolctl.threadpool_limits(1, user_api="blas")
        except ImportError:  # optional: only a speed matter
            pass
        _SINGLE_THREADED = True


def _as_rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"SRPairTransform expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"SRPairTransform expects an HxWx3 RGB image, got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


class SRPairTransform(grain.transforms.RandomMap):
    """{"image": uint8 HxWx3} -> {"image": gt, "lq": lq, "cond": cond}, float32 in [-1, 1].

    gt: (crop, crop, 3), the (sharpened, if use_sharpen) GT crop; lq: (crop / scale, ...) on the
    1/255 grid before the affine map; cond: lq resized to crop size (bicubic, clipped).
    Steps: flip -> reflect-101 pad (bottom/right) to the degradation crop -> random crop ->
    (channel shuffle, if channel_shuffle_prob; training only, see `for_eval`) -> USM -> degrade
    the whole crop -> paired random crop of (gt, lq) down to `crop_size`.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, crop_size: int):
        config_lib.validate_degradation_config(cfg, crop_size)
        self.cfg = _settings(cfg)
        self.crop_size = crop_size
        self.degrade_size = cfg.degrade_size or crop_size

    def __repr__(self) -> str:
        return (
            f"SRPairTransform(preset={self.cfg.preset!r}, crop_size={self.crop_size}, "
            f"degrade_size={self.degrade_size}, jpeg_impl={self.cfg.jpeg_impl!r})"
        )

    def for_eval(self) -> SRPairTransform:
        """This transform for held-out sets: training-only augmentation (the channel shuffle)
        off; the degradation and everything else unchanged, so eval crops stay the same."""
        if not self.cfg.channel_shuffle_prob:
            return self
        out = copy.copy(self)
        out.cfg = types.SimpleNamespace(**{**vars(self.cfg), "channel_shuffle_prob": 0.0})
        return out

    def _gt_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.degrade_size
        if rng.random() < self.cfg.flip_prob:
            image = image[:, ::-1]
        h, w = image.shape[:2]
        if h < size or w < size:
            image = cv2.copyMakeBorder(
                np.ascontiguousarray(image),
                0,
                max(0, size - h),
                0,
                max(0, size - w),
                cv2.BORDER_REFLECT_101,
            )
            h, w = image.shape[:2]
        top = rng.integers(h - size + 1)
        left = rng.integers(w - size + 1)
        crop = image[top : top + size, left : left + size]
        shuffle = self.cfg.channel_shuffle_prob
        if shuffle > 0 and rng.random() < shuffle:
            crop = crop[..., rng.permutation(3)]
        return crop.astype(np.float32) / np.float32(255.0)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        _single_threaded()
        cfg, crop, scale = self.cfg, self.crop_size, self.cfg.scale
        gt = self._gt_crop(_as_rgb_uint8(element["image"]), rng)
        if cfg.use_sharpen:
            gt = usm_sharpen(gt, cfg.usm_weight, cfg.usm_radius, cfg.usm_threshold)
        lq = degrade(gt, rng, cfg)
        if self.degrade_size > crop:
            n_lq, c_lq = self.degrade_size // scale, crop // scale
            top = int(rng.integers(n_lq - c_lq + 1))
            left = int(rng.integers(n_lq - c_lq + 1))
            lq = lq[top : top + c_lq, left : left + c_lq]
            gt = gt[top * scale : (top + c_lq) * scale, left * scale : (left + c_lq) * scale]
        return sr_example(gt, lq, crop)


def sr_example(gt: np.ndarray, lq: np.ndarray, crop: int) -> dict:
    """One training example from a high-quality crop `gt` [crop, crop, 3] and its low-quality
    counterpart `lq` [crop / scale, crop / scale, 3], both float32 in [0, 1]: "image" (gt),
    "lq" and "cond" (lq bicubically upsampled to the crop size, clipped), all in [-1, 1]."""
    lq = np.ascontiguousarray(lq)
    cond = np.clip(cv2.resize(lq, (crop, crop), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    two, one = np.float32(2.0), np.float32(1.0)
    return {
        "image": np.ascontiguousarray(gt * two - one, dtype=np.float32),
        "lq": lq * two - one,
        "cond": cond * two - one,
    }
