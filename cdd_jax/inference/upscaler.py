"""`Upscaler`: a loaded student applied to images of any size through overlapping tiles.

    up = cdd_jax.Upscaler.load("runs/sr/student")       # or .load() for the shipped student
    big = up(image_uint8, steps=4, seed=0)              # (H, W[, C]) uint8/uint16 -> (4H, 4W[, C])

The condition is the input upsampled by bicubic interpolation over the WHOLE image and mapped to
[-1, 1], as the training pairs' `cond` (`data/degradations/transform.py`); the tiles are crops of
it, their noise crops of one noise plane (`cdd_jax.evaluate.tiling`, whose `upscale_tiled` is the
tiled path itself, shared with the full-image evaluations). Every tile runs the student's K-step
sampler (`few_step_sample`, the sampler the job evaluated) on its own; the outputs are blended.
Memory: the network sees `tile_batch` tiles at a time; the condition is made and the tiles are
blended one row of tiles at a time (bands of the tile's height: `condition_rows`, `Blender`), so
the working memory does not grow with the image's height; what does grow with the image is the
output itself (float32 while it is assembled, 12 bytes per output pixel, then the returned
array).
Colours: the values are taken as sRGB (embedded ICC profiles are not applied). Greyscale stays
greyscale (the network sees it as grey RGB; the output is the mean of its channels); alpha is
upscaled separately by bicubic interpolation.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cdd_jax.distill.sampling import RENOISE
from cdd_jax.evaluate.sr import student_sample
from cdd_jax.evaluate.tiling import default_overlap, make_grid, tile_sampler, upscale_tiled
from cdd_jax.inference.student import Student, load_student


class Upscaler:
    """Upscales images by the student's scale. `tile` (output px, default: the training crop
    size; the student was trained on crops of that size and does not carry over to much larger
    ones), `overlap` (default a quarter tile), `tile_batch` tiles per network call, `renoise`
    (default: the first sampler the job evaluated), `progress`: a progress bar over tiles."""

    def __init__(self, student: Student, *, tile: int | None = None, overlap: int | None = None,
                 tile_batch: int = 16, renoise: str | None = None, progress: bool = False):
        self.student = student
        self.scale = student.scale
        self.tile = int(tile or student.crop_size)
        self.overlap = default_overlap(self.tile, self.scale) if overlap is None else int(overlap)
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        self.tile_batch = int(tile_batch)
        sampler = student.info.get("sampler", {})
        self.renoise = renoise or sampler.get("default_renoise", RENOISE[0])
        if self.renoise not in RENOISE:
            raise ValueError(f"unknown renoise {self.renoise!r}; valid: {RENOISE}")
        self.default_steps = int(sampler.get("default_steps", 1))
        self.progress = progress
        make_grid(self.tile, self.tile, self.tile, self.overlap, align=self.scale)  # Checks.
        self._check_tile()
        self._samplers: dict = {}

    @classmethod
    def load(cls, path: str | None = None, **kwargs) -> Upscaler:
        """An Upscaler of the student folder at `path` (default: the shipped student)."""
        return cls(load_student(path), **kwargs)

    def _check_tile(self) -> None:
        t = jax.ShapeDtypeStruct((1, self.tile, self.tile, 3), jnp.float32)
        try:
            jax.eval_shape(self.student.apply_fn, self.student.params, t,
                           jax.ShapeDtypeStruct((1,), jnp.float32), t, None)
        except Exception as e:  # noqa: BLE001 - any shape error of the network
            raise ValueError(f"tile={self.tile} px is not a size this network accepts "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use a "
                             f"multiple of the training crop size {self.student.crop_size}") from e

    def _sampler(self, steps: int, renoise: str):
        """The tile sampler of K = `steps` with `renoise` (compiled once each)."""
        if (steps, renoise) not in self._samplers:
            s = self.student
            self._samplers[(steps, renoise)] = tile_sampler(
                student_sample(s.config, s.apply_fn, s.schedule, steps, renoise), self.tile)
        return self._samplers[(steps, renoise)]

    def upscale_rgb(self, rgb: np.ndarray, *, steps: int | None = None, seed: int = 0,
                    renoise: str | None = None, offset: tuple[int, int] = (0, 0),
                    desc: str | None = None) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1] -> (sH, sW, 3) float32 in [0, 1] (`upscale_tiled`).
        `offset` shifts the tile grid (output px, multiples of the scale); the noise does not
        move with it."""
        s, t = self.scale, self.tile
        h, w = rgb.shape[:2]
        n = len(make_grid(h * s, w * s, t, self.overlap, align=s, offset=offset))
        sample = self._sampler(int(steps or self.default_steps), renoise or self.renoise)
        with tqdm(total=n, desc=desc, unit="tile", disable=not self.progress, leave=False) as bar:
            return upscale_tiled(rgb, sample, self.student.params, scale=s, tile=t,
                                 overlap=self.overlap, tile_batch=self.tile_batch, seed=seed,
                                 offset=offset, on_tiles=bar.update)

    def __call__(self, image: np.ndarray, steps: int | None = None, seed: int = 0, *,
                 renoise: str | None = None, offset: tuple[int, int] = (0, 0),
                 desc: str | None = None) -> np.ndarray:
        """Upscales a uint8 or uint16 image (H, W), (H, W, 1|2|3|4): grey, grey + alpha, RGB,
        RGBA; returns the same dtype and channel layout, `scale` times larger. `steps` (K)
        defaults to the student's largest evaluated K."""
        image = np.asarray(image)
        if image.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"expected a uint8 or uint16 image, got dtype {image.dtype}")
        squeeze = image.ndim == 2
        if squeeze:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
            raise ValueError(f"expected an (H, W) or (H, W, 1|2|3|4) image, got {image.shape}")
        h, w, c = image.shape
        if h == 0 or w == 0:
            raise ValueError(f"zero-sized image ({h}x{w})")
        top = np.float32(np.iinfo(image.dtype).max)
        f = image.astype(np.float32) / top
        colour = f[..., :3] if c >= 3 else np.repeat(f[..., :1], 3, axis=2)
        out = self.upscale_rgb(colour, steps=steps, seed=seed, renoise=renoise, offset=offset,
                               desc=desc)
        if c <= 2:
            out = out.mean(axis=2, keepdims=True)
        if c in (2, 4):
            s = self.scale
            alpha = cv2.resize(np.ascontiguousarray(f[..., -1]), (w * s, h * s),
                               interpolation=cv2.INTER_CUBIC).reshape(h * s, w * s, 1)
            out = np.concatenate([out, np.clip(alpha, 0.0, 1.0)], axis=2)
        out *= top  # In place: whole-image float arrays are what grows with the image.
        result = np.round(out, out=out).astype(image.dtype)
        return result[..., 0] if squeeze else result
