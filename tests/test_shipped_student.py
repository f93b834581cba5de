"""Seams of the SHIPPED student (`cdd_jax/assets/student`) on a held-out photo (issue 19,
acceptance 2): two tile grids shifted by half a tile agree far better than two noise seeds do,
and the tile borders carry no more gradient energy than the rest of the image, at K = 1 and 4,
with both samplers and the student's default tiling (32 px tiles, 8 px overlap)."""

import cv2
import numpy as np
import pytest
import skimage.data

from cdd_jax.evaluate.tiling import make_grid, seam_ratio
from cdd_jax.inference.upscaler import Upscaler

# Bounds (measured values in BUILD_NOTES.md section 12, "Seams of the shipped student").
SHIFT_VS_SEED = 0.5  # Mean |grid A - grid B| over mean |seed 0 - seed 1|.
SHIFT_ABS = 5.0 / 255  # Mean |grid A - grid B| in [0, 1] units.
SEAM_EXCESS = 1.15  # Seam ratios (see the test's docstring) must stay under this.


@pytest.fixture(scope="module")
def shipped():
    return Upscaler.load(tile_batch=16)


@pytest.fixture(scope="module")
def lr_photo():
    """A 32x40 crop of skimage's coffee (a held-out photo of the bundled split), area-
    downsampled by 4: output 128x160, 6x7 tiles."""
    hr = skimage.data.coffee()[100:228, 200:360]
    return cv2.resize(hr, (40, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def test_shipped_student_defaults(shipped):
    assert (shipped.scale, shipped.tile, shipped.overlap) == (4, 32, 8)
    # "fresh": chosen on the validation photos (configs/sr.py's evaluate.default_renoise).
    assert shipped.renoise == "fresh" and shipped.default_steps == 4


def _steps_between_tiles(image: np.ndarray, grid, size: float) -> np.ndarray:
    """`image` plus `size` on every other tile of `grid` (a checkerboard of offsets)."""
    (top, _), (left, _) = grid.pads
    rows = (np.arange(image.shape[0])[:, None] + top) // grid.stride
    cols = (np.arange(image.shape[1])[None, :] + left) // grid.stride
    return image + ((rows + cols) % 2)[..., None] * np.float32(size)


@pytest.mark.parametrize("steps, renoise", [
    (1, "fresh"),  # K = 1 never re-noises: the same for both samplers
    pytest.param(4, "fresh", marks=pytest.mark.slow),
    pytest.param(4, "ddim", marks=pytest.mark.slow),
])
def test_shipped_student_shifted_grids_agree_and_show_no_seams(shipped, lr_photo, steps, renoise):
    """Grids A and B (shifted by half a tile, 16 px) with the same noise field; seed 1 on grid A
    for scale. Seams: the seam ratio (`tiling.seam_ratio`) of the DIFFERENCE A - B on A's and on
    B's tile borders (the photo's content cancels in it; a seam of either grid would stand out),
    and, on the images themselves, each grid's ratio on its own borders over the other grid's
    image on the same rows and columns (on a small photo the raw ratio mostly reads which rows
    hold edges). A step of 2/255 between neighbouring tiles of A must read above the bound."""
    half = shipped.tile // 2
    a = shipped.upscale_rgb(lr_photo, steps=steps, seed=0, renoise=renoise)
    b = shipped.upscale_rgb(lr_photo, steps=steps, seed=0, renoise=renoise, offset=(half, half))
    other_seed = shipped.upscale_rgb(lr_photo, steps=steps, seed=1, renoise=renoise)
    shift_diff = float(np.abs(a - b).mean())
    seed_diff = float(np.abs(a - other_seed).mean())
    h, w = a.shape[:2]
    grid_a = make_grid(h, w, shipped.tile, shipped.overlap, align=4)
    grid_b = make_grid(h, w, shipped.tile, shipped.overlap, align=4, offset=(half, half))
    on_difference = [seam_ratio(a - b, grid_a), seam_ratio(a - b, grid_b)]
    on_images = [seam_ratio(a, grid_a) / seam_ratio(b, grid_a),
                 seam_ratio(b, grid_b) / seam_ratio(a, grid_b)]
    stepped = seam_ratio(_steps_between_tiles(a, grid_a, 2 / 255) - b, grid_a)
    print(f"\nK={steps} {renoise}: grid shift {shift_diff * 255:.3f}/255, seed change "
          f"{seed_diff * 255:.3f}/255 (ratio {shift_diff / seed_diff:.3f}); seam ratio of A - B "
          f"on A's / B's borders {on_difference[0]:.3f} / {on_difference[1]:.3f}; on the images "
          f"{on_images[0]:.3f} / {on_images[1]:.3f}; a 2/255 step on A reads {stepped:.3f}")
    assert shift_diff < SHIFT_VS_SEED * seed_diff
    assert shift_diff < SHIFT_ABS
    assert max(on_difference + on_images) < SEAM_EXCESS < stepped
