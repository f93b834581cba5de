"""`Upscaler`: a loaded student applied to images of any size through overlapping tiles.

    up = cdd_jax.Upscaler.load("runs/sr/student")       # or .load() for the shipped student
    big = up(image_uint8, steps=4, seed=0)              # (H, W[, C]) uint8/uint16 -> (4H, 4W[, C])

The condition is the input upsampled by bicubic interpolation over the WHOLE image and mapped to
[-1, 1], as the training pairs' `cond` (`data/degradations/transform.py`); the tiles are crops of
it, their noise crops of one noise plane (`tiling.py`). Every tile runs the student's K-step
sampler (`few_step_sample`, the sampler the job evaluated) on its own; the outputs are blended.
Memory: the network sees `tile_batch` tiles at a time; the condition is made and the tiles are
blended one row of tiles at a time (bands of the tile's height, `condition_rows`, `Blender`), so
the working memory does not grow with the image's height; what does grow with the image is the
output itself (float32 while it is assembled, 12 bytes per output pixel, then the returned
array).
Colours: the values are taken as sRGB (embedded ICC profiles are not applied). Greyscale stays
greyscale (the network sees it as grey RGB; the output is the mean of its channels); alpha is
upscaled separately by bicubic interpolation.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cdd_jax.distill.sampling import RENOISE, few_step_sample
from cdd_jax.inference.student import Student, load_student
from cdd_jax.inference.tiling import Blender, Grid, make_grid, noise_tiles, reflect_index


def default_overlap(tile: int, scale: int) -> int:
    """A quarter of the tile, rounded down to a multiple of the scale."""
    return tile // 4 // scale * scale


def condition_rows(lr: np.ndarray, grid: Grid, y0: int, scale: int) -> np.ndarray:
    """Canvas rows [y0, y0 + tile) of the condition, all canvas columns: `lr` upsampled by cv2
    bicubic, clipped to [0, 1], mapped to [-1, 1] and reflect-padded to the canvas, exactly as
    if the whole image were upsampled and padded (`pad_to_canvas`), but computed from the few
    low-resolution rows these output rows depend on (bicubic reads 2 input rows either side;
    3 are taken). Memory: a band of the tile's height, whatever the image's."""
    (top, _), (left, _) = grid.pads
    rows = reflect_index(np.arange(y0, y0 + grid.tile) - top, grid.height)
    cols = reflect_index(np.arange(grid.canvas_shape[1]) - left, grid.width)
    a = max(int(rows.min()) // scale - 3, 0)
    b = min(int(rows.max()) // scale + 4, lr.shape[0])
    up = cv2.resize(lr[a:b], (grid.width, (b - a) * scale), interpolation=cv2.INTER_CUBIC)
    band = up.reshape((b - a) * scale, grid.width, -1)[rows - a * scale][:, cols]
    np.clip(band, 0.0, 1.0, out=band)
    band *= np.float32(2.0)
    band -= np.float32(1.0)
    return band


def _emit(out: np.ndarray, finished: tuple[int, np.ndarray]) -> None:
    y0, rows = finished
    out[y0:y0 + len(rows)] = rows


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
        self._sample = jax.jit(self._sample_tiles, static_argnames=("steps", "renoise"))

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

    def _sample_tiles(self, params, cond, origins, key, *, steps: int, renoise: str):
        noise = lambda i: noise_tiles(jax.random.fold_in(key, i), origins, self.tile, 3)
        s = self.student
        return few_step_sample(s.apply_fn, params, cond, key, schedule=s.schedule,
                               num_steps=steps, grid=s.config.evaluate.grid, renoise=renoise,
                               noise=noise, prediction_type=s.config.diffusion.prediction_type)

    def upscale_rgb(self, rgb: np.ndarray, *, steps: int | None = None, seed: int = 0,
                    renoise: str | None = None, offset: tuple[int, int] = (0, 0),
                    desc: str | None = None) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1] -> (sH, sW, 3) float32 in [0, 1]. `offset` shifts the
        tile grid (output px, multiples of the scale); the noise does not move with it."""
        s, t = self.scale, self.tile
        h, w = rgb.shape[:2]
        lr = np.ascontiguousarray(rgb, dtype=np.float32)
        grid = make_grid(h * s, w * s, t, self.overlap, align=s, offset=offset)
        origins = grid.origins()
        to_global = np.array([grid.start_y, grid.start_x], np.int32)
        key = jax.random.key(seed)
        sample = functools.partial(self._sample, steps=int(steps or self.default_steps),
                                   renoise=renoise or self.renoise)
        out = np.empty((h * s, w * s, 3), np.float32)
        blender, bands, row = Blender(grid, 3), {}, 0
        n, tb = len(grid), self.tile_batch
        with tqdm(total=n, desc=desc, unit="tile", disable=not self.progress, leave=False) as bar:
            for lo in range(0, n, tb):
                idx = np.arange(lo, min(lo + tb, n))
                take = np.concatenate([idx, np.full(tb - len(idx), idx[-1])])  # A full batch.
                for r in np.unique(take // grid.nx):
                    if r not in bands:
                        bands[r] = condition_rows(lr, grid, r * grid.stride, s)
                tiles = np.stack([bands[i // grid.nx][:, x:x + t] for i, (_, x) in
                                  zip(take, origins[take], strict=True)])
                values = np.asarray(sample(self.student.params, tiles,
                                           origins[take] + to_global, key))
                for j, i in enumerate(idx):
                    while i // grid.nx > row:  # The previous row of tiles is complete.
                        _emit(out, blender.finish_row())
                        bands.pop(row, None)
                        row += 1
                    blender.add(int(i), origins[i], values[j])
                bar.update(len(idx))
        _emit(out, blender.finish_row())
        out += np.float32(1.0)
        out /= np.float32(2.0)
        return np.clip(out, 0.0, 1.0, out=out)

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
