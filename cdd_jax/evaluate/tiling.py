"""Tiles over an output image of any size: a regular grid of overlapping tiles, smooth blending
weights, Gaussian noise that is ONE field over the whole output, and `upscale_tiled`, the tiled
path every whole-image result goes through (`cdd_jax.Upscaler`, `python -m cdd_jax.evaluate` and
the jobs' photo evaluation, `cdd_jax.evaluate.photos`).

Design (BUILD_NOTES.md, "Upscaling"):
- The grid: tiles of `tile` px every `stride = tile - overlap` px, the first one starting
  `margin + offset` px before the image (`margin = overlap // 2`, so the image's borders are not
  tile borders); the canvas under the grid is the condition reflect-padded. Tile size, overlap,
  margin and offset are multiples of `align` (the SR scale): every tile then sits on the
  low-resolution pixel grid, as the training crops did.
- Blending: separable raised-cosine ramps across each overlap (w and 1 - w from the two sides),
  weight exactly 1 elsewhere and on sides without a neighbour; the blend divides by the summed
  weight. So a pixel that one tile covers gets that tile's value exactly, and one tile covering
  the image gives the network's output bit for bit.
- Noise: value at global output pixel (y, x) of draw i depends only on (key, i, y, x): the plane
  is cut into `NOISE_BLOCK` px blocks, each drawn from the key folded with its block indices. A
  pixel sees the same noise in every tile and under every grid; the result depends on the tiling
  only through what each tile's network sees around the pixel and through the blending.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

# sample(params, cond, rng, noise) -> x: a sampler of conditional tiles (NHWC in [-1, 1]) taking its
# Gaussian draws from `noise(i)` (`cdd_jax.distill.sampling.NoiseFn`).
TileSampleFn = Callable[[Any, jax.Array, jax.Array, Callable[[int], jax.Array]], jax.Array]

NOISE_BLOCK = 16  # Side of the blocks the noise plane is drawn in (any value: a speed matter).
_BLOCK_OFFSET = 1 << 20  # Makes block indices of the padding (negative) non-negative.


@dataclasses.dataclass(frozen=True)
class Grid:
    """A tile grid over a `height` x `width` image (output pixels)."""

    height: int
    width: int
    tile: int
    overlap: int
    start_y: int  # Position of the first tile's top edge relative to the image (<= 0).
    start_x: int
    ny: int
    nx: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def canvas_shape(self) -> tuple[int, int]:
        return ((self.ny - 1) * self.stride + self.tile, (self.nx - 1) * self.stride + self.tile)

    @property
    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) padding that turns the image into the canvas."""
        ch, cw = self.canvas_shape
        top, left = -self.start_y, -self.start_x
        return (top, ch - top - self.height), (left, cw - left - self.width)

    def __len__(self) -> int:
        return self.ny * self.nx

    def origins(self) -> np.ndarray:
        """(n, 2) top-left corners of the tiles on the canvas, row-major."""
        ys, xs = np.meshgrid(np.arange(self.ny) * self.stride, np.arange(self.nx) * self.stride,
                             indexing="ij")
        return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int32)

    def weights(self, index: int) -> np.ndarray:
        """(tile, tile) blending weight of tile `index`."""
        iy, ix = divmod(index, self.nx)
        return np.outer(_ramp(self.tile, self.overlap, iy > 0, iy < self.ny - 1),
                        _ramp(self.tile, self.overlap, ix > 0, ix < self.nx - 1))


def _ramp(tile: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    w = np.ones(tile, np.float32)
    if overlap:
        up = (0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)).astype(np.float32)
        if before:
            w[:overlap] = up
        if after:
            w[tile - overlap:] = np.float32(1) - up
    return w


def _count(length: int, start: int, tile: int, stride: int) -> int:
    return max(1, math.ceil((length - start - tile) / stride) + 1)


def make_grid(height: int, width: int, tile: int, overlap: int, *, align: int = 1,
              offset: tuple[int, int] = (0, 0)) -> Grid:
    """The grid of `tile` px tiles overlapping by `overlap` px that covers the image, shifted
    by `offset` px (>= 0) up and left from its usual place. Sizes must be multiples of `align`."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile a zero-sized image ({height}x{width})")
    for name, value in (("tile", tile), ("overlap", overlap), ("offset", offset[0]),
                        ("offset", offset[1])):
        if value < 0 or value % align:
            raise ValueError(f"{name}={value} must be a non-negative multiple of {align} (the "
                             "scale: tiles sit on the low-resolution pixel grid)")
    if tile < 1 or 2 * overlap > tile:
        raise ValueError(f"need tile >= 1 and overlap <= tile / 2; got tile={tile}, "
                         f"overlap={overlap}")
    margin = overlap // 2 // align * align
    start_y, start_x = -margin - offset[0], -margin - offset[1]
    stride = tile - overlap
    return Grid(height, width, tile, overlap, start_y, start_x,
                _count(height, start_y, tile, stride), _count(width, start_x, tile, stride))


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Where `np.pad(..., mode="reflect")` reads position `index` (any integer, in or outside
    [0, n)) of an axis of length `n`: mirrored at the end samples, which are not repeated."""
    index = np.asarray(index)
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    i = np.mod(index, period)
    return np.where(i < n, i, period - i)


def noise_tiles(key: jax.Array, origins: jax.Array, tile: int, channels: int) -> jax.Array:
    """(B, tile, tile, C) crops of the global noise plane at `origins` (B, 2) (global output
    coordinates, may be negative). Jittable; the block indices are traced."""
    b = NOISE_BLOCK
    nb = -(-tile // b) + 1

    def block(by, bx):
        k = jax.random.fold_in(jax.random.fold_in(key, (by + _BLOCK_OFFSET).astype(jnp.uint32)),
                               (bx + _BLOCK_OFFSET).astype(jnp.uint32))
        return jax.random.normal(k, (b, b, channels), jnp.float32)

    def one(origin):
        b0 = jnp.floor_divide(origin, b)
        rows = b0[0] + jnp.arange(nb)
        cols = b0[1] + jnp.arange(nb)
        blocks = jax.vmap(lambda by: jax.vmap(lambda bx: block(by, bx))(cols))(rows)
        plane = blocks.transpose(0, 2, 1, 3, 4).reshape(nb * b, nb * b, channels)
        dy, dx = origin[0] - b0[0] * b, origin[1] - b0[1] * b
        return jax.lax.dynamic_slice(plane, (dy, dx, 0), (tile, tile, channels))

    return jax.vmap(one)(jnp.asarray(origins, jnp.int32))


class Blender:
    """Blends the tiles one row of tiles at a time, in a band of `tile` canvas rows: tiles are
    added in the grid's (row-major) order; after the last tile of a row, `finish_row` divides
    the rows that no later tile reaches by their summed weight and hands them out. Memory: the
    band, whatever the image's height. Per pixel the same float32 sums in the same order as
    blending the whole canvas at once, so the result does not depend on the banding."""

    def __init__(self, grid: Grid, channels: int):
        self.grid = grid
        width = grid.canvas_shape[1]
        self.acc = np.zeros((grid.tile, width, channels), np.float32)
        self.wsum = np.zeros((grid.tile, width), np.float32)
        self.top = 0  # Canvas row of the band's first row.

    def add(self, index: int, origin: np.ndarray, tile_values: np.ndarray) -> None:
        y, x = int(origin[0]), int(origin[1])
        if y != self.top:
            raise ValueError(f"tile {index} starts at canvas row {y}, not in the current row of "
                             f"tiles (row {self.top}): add tiles in the grid's order")
        w = self.grid.weights(index)
        t = self.grid.tile
        self.acc[:, x:x + t] += w[..., None] * tile_values
        self.wsum[:, x:x + t] += w

    def finish_row(self) -> tuple[int, np.ndarray]:
        """(first image row, blended image rows (n, W, C)) that the row of tiles just added
        completes (the last row of tiles completes the rest); n may be 0 in the padding."""
        g = self.grid
        last = self.top + g.stride >= g.canvas_shape[0] - g.overlap
        done = g.tile if last else g.stride
        (pad_top, _), (left, _) = g.pads
        lo = max(self.top, pad_top)
        hi = min(self.top + done, pad_top + g.height)
        rows = np.divide(self.acc[lo - self.top:max(hi, lo) - self.top, left:left + g.width],
                         self.wsum[lo - self.top:max(hi, lo) - self.top, left:left + g.width,
                                   None])
        keep = g.tile - done
        self.acc[:keep] = self.acc[done:]
        self.acc[keep:] = 0.0
        self.wsum[:keep] = self.wsum[done:]
        self.wsum[keep:] = 0.0
        self.top += done
        return lo - pad_top, rows


def seam_ratio(image: np.ndarray, grid: Grid) -> float:
    """Seam metric: the mean squared difference between neighbouring pixels across the rows and
    columns where a tile of `grid` starts or ends inside the image, over the same across all
    other rows and columns. About 1 when the tile borders are invisible; a step between tiles
    raises it (8/255 between neighbouring tiles of a smooth photo reads ~1.7)."""
    img = np.asarray(image, np.float64)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"image {img.shape[:2]} is not the grid's {grid.height}x{grid.width}")
    (top, _), (left, _) = grid.pads
    edges_y = {v for y in grid.origins()[:, 0] for v in (y - top, y - top + grid.tile)}
    edges_x = {v for x in grid.origins()[:, 1] for v in (x - left, x - left + grid.tile)}
    gx = ((img[:, 1:] - img[:, :-1]) ** 2).mean(axis=(0, 2))  # Across the border x-1 | x.
    gy = ((img[1:] - img[:-1]) ** 2).mean(axis=(1, 2))
    at_x = np.array([x in edges_x for x in range(1, grid.width)], bool)
    at_y = np.array([y in edges_y for y in range(1, grid.height)], bool)
    seam = np.concatenate([gx[at_x], gy[at_y]])
    rest = np.concatenate([gx[~at_x], gy[~at_y]])
    if seam.size == 0 or rest.size == 0:
        raise ValueError("the grid has no tile border inside the image (one tile): no seams")
    return float(seam.mean() / rest.mean())


def default_overlap(tile: int, scale: int) -> int:
    """A quarter of the tile, rounded down to a multiple of the scale."""
    return tile // 4 // scale * scale


def tile_sampler(sample: TileSampleFn, tile: int, channels: int = 3):
    """jit(params, cond_tiles, origins, key) -> x: `sample` run on a batch of tiles whose draws are
    crops at `origins` (global output coordinates) of the one noise field of `key`
    (`noise_tiles`; draw i folds i into the key)."""

    def run(params, cond, origins, key):
        noise = lambda i: noise_tiles(jax.random.fold_in(key, i), origins, tile, channels)
        return sample(params, cond, key, noise)

    return jax.jit(run)


def condition_rows(lr: np.ndarray, grid: Grid, y0: int, scale: int) -> np.ndarray:
    """Canvas rows [y0, y0 + tile) of the condition, all canvas columns: `lr` upsampled by cv2
    bicubic, clipped to [0, 1], mapped to [-1, 1] (as the training pairs' `cond`) and
    reflect-padded to the canvas, exactly as if the whole image were upsampled and padded by
    `np.pad(..., grid.pads, mode="reflect")`, but computed from the few low-resolution rows these
    output rows depend on (bicubic reads 2 input rows either side; 3 are taken). Memory: a band
    of the tile's height, whatever the image's."""
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


def upscale_tiled(rgb: np.ndarray, sample, params, *, scale: int, tile: int, overlap: int,
                  tile_batch: int, seed: int = 0, offset: tuple[int, int] = (0, 0),
                  on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] -> (sH, sW, 3) float32 in [0, 1] through tiles.

    The condition is `rgb` upsampled by cv2 bicubic (as over the whole image), clipped and mapped
    to [-1, 1], reflect-padded to the grid's canvas, made one row of tiles at a time
    (`condition_rows`); `sample` (a `tile_sampler`) sees `tile_batch` tiles per call (the last
    batch padded by repeating a tile: one compilation) and the outputs are blended a row of tiles
    at a time (`Blender`), so the only whole-image array is the float32 output. `offset` shifts
    the tile grid (output px, multiples of the scale); the noise does not move with it.
    `on_tiles(n)`: called after each batch with the number of tiles done (a progress bar)."""
    s, t = scale, tile
    h, w = rgb.shape[:2]
    lr = np.ascontiguousarray(rgb, dtype=np.float32)
    grid = make_grid(h * s, w * s, t, overlap, align=s, offset=offset)
    origins = grid.origins()
    to_global = np.array([grid.start_y, grid.start_x], np.int32)
    key = jax.random.key(seed)
    out = np.empty((h * s, w * s, 3), np.float32)
    blender, bands, row = Blender(grid, 3), {}, 0
    n, tb = len(grid), tile_batch
    for lo in range(0, n, tb):
        idx = np.arange(lo, min(lo + tb, n))
        take = np.concatenate([idx, np.full(tb - len(idx), idx[-1])])  # A full batch.
        for r in np.unique(take // grid.nx):
            if r not in bands:
                bands[r] = condition_rows(lr, grid, r * grid.stride, s)
        tiles = np.stack([bands[i // grid.nx][:, x:x + t]
                          for i, (_, x) in zip(take, origins[take], strict=True)])
        values = np.asarray(sample(params, tiles, origins[take] + to_global, key))
        for j, i in enumerate(idx):
            while i // grid.nx > row:  # The previous row of tiles is complete.
                _emit(out, blender.finish_row())
                bands.pop(row, None)
                row += 1
            blender.add(int(i), origins[i], values[j])
        if on_tiles is not None:
            on_tiles(len(idx))
    _emit(out, blender.finish_row())
    out += np.float32(1.0)
    out /= np.float32(2.0)
    return np.clip(out, 0.0, 1.0, out=out)


def _emit(out: np.ndarray, finished: tuple[int, np.ndarray]) -> None:
    y0, rows = finished
    out[y0:y0 + len(rows)] = rows
