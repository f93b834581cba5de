"""Evaluation on bundled photos at a size where the metrics mean something (issue 21): the
`evaluate.photos` config section, the photo sets of the named splits, and the per-image run that
`python -m cdd_jax.evaluate` and the jobs share.

Every method goes through the tiled path of `cdd_jax.Upscaler` (`tiling.upscale_tiled`: the
condition is the bicubic upsampling of the WHOLE input, the noise one field over the output,
tiles of the training crop size blended); the low-resolution inputs are made from the
ground-truth crops by the job's own degradation, generator seeded by (seed, image index); the
outputs are rounded to 8 bits and scored by the SR papers' protocol (`protocol.image_metrics`:
PSNR on RGB and on Y, SSIM on Y, a border of `scale` px cropped; LPIPS on the images).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping

import cv2
import jax
import ml_collections
import numpy as np

from cdd_jax import config_checks as checks
from cdd_jax.console import note
from cdd_jax.data.bundled import SPLITS, load_bundled_image
from cdd_jax.data.degradations import degrade
from cdd_jax.evaluate.protocol import PROTOCOL, image_metrics
from cdd_jax.evaluate.report import markdown_table
from cdd_jax.evaluate.tiling import default_overlap, make_grid, tile_sampler, upscale_tiled

PHOTO_SPLITS = ("validation", "test")  # `evaluate.photos.splits` may name these.
MIN_SIZE = 128  # Smallest crop side (HR px) the jobs accept: LPIPS-Alex's layers see > 1 px.
# key (method, sampler, steps) -> upscale(lr float32 (h, w, 3) in [0, 1]) -> (sh, sw, 3) in [0, 1]
Upscale = Callable[[np.ndarray], np.ndarray]


def photos_config() -> ml_collections.ConfigDict:
    """The `evaluate.photos` section: which bundled photos, at what size, through which tiles."""
    c = ml_collections.ConfigDict()
    # Bundled photo splits evaluated after training, each written to eval/photos_<split>.* (sr
    # job) or into each row's eval.json (Table 1): "validation" (settings are chosen on it) and
    # "test" (reported on, never chosen on); () turns the photo evaluation off.
    c.splits = PHOTO_SPLITS
    # Side of the square ground-truth crops in px (a multiple of the scale, >= 128); 0: the
    # whole photos (cropped to a multiple of the scale; costly: BUILD_NOTES.md section 15).
    c.size = 128
    c.crop_grid = 1  # crop_grid x crop_grid crops per photo, evenly spaced (1: the centre crop).
    c.seed = 0  # Seed of the degradation (generator (seed, image index)) and of the noise field.
    c.tile = 0  # Tile side in output px (0: the training crop size, as `cdd_jax.Upscaler`).
    c.overlap = -1  # Tile overlap in output px (-1: a quarter tile, as `cdd_jax.Upscaler`).
    # Tiles per network call; 0: all the tiles of one crop in one call (16 for whole photos).
    c.tile_batch = 0
    # Methods with more network evaluations per image than this are not run on the photos (their
    # rows stay crop-only); 0: every method (the fine-tuned model's 200-step DDIM dominates).
    c.max_steps = 0
    return c


def validate_photos_config(cfg: ml_collections.ConfigDict, scale: int, p: str = "") -> None:
    p += "photos."
    checks.check_keys(cfg, photos_config(), p)
    checks.subset(cfg, "splits", PHOTO_SPLITS, prefix=p, allow_empty=True)
    for key in ("size", "seed", "tile", "tile_batch", "max_steps"):
        checks.number(cfg, key, 0, integer=True, prefix=p)
    checks.number(cfg, "crop_grid", 1, integer=True, prefix=p)
    checks.number(cfg, "overlap", -1, integer=True, prefix=p)
    if cfg.size and (cfg.size < MIN_SIZE or cfg.size % scale):
        raise ValueError(f"{p}size={cfg.size} must be 0 (whole photos) or a multiple of the scale "
                         f"{scale} of at least {MIN_SIZE} px")


@dataclasses.dataclass(frozen=True)
class Photo:
    """One evaluation image: its name, uint8 RGB ground truth and uint8 RGB input."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def degraded_lr(hr: np.ndarray, degradation, seed: int, index: int) -> np.ndarray:
    """uint8 LR of a uint8 RGB ground truth: `degrade`, generator seeded by (seed, index)."""
    lq = degrade(hr.astype(np.float32) / np.float32(255.0),
                 np.random.default_rng([seed, index]), degradation)
    return np.round(np.clip(lq, 0.0, 1.0) * 255.0).astype(np.uint8)


def bicubic_rgb8(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: cv2 bicubic upsampling of a uint8 LR, rounded to uint8."""
    up = cv2.resize(lr.astype(np.float32) / np.float32(255.0),
                    (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    return np.round(np.clip(up, 0.0, 1.0) * 255.0).astype(np.uint8)


def crop_origins(height: int, width: int, size: int, grid: int, scale: int) -> list[tuple]:
    """Top-left corners of `grid` x `grid` square crops of side `size`, evenly spaced (grid 1:
    the centre), on multiples of `scale`; the image must hold one crop."""
    if size > height or size > width:
        raise ValueError(f"a {size} px crop does not fit a {width}x{height} photo")
    pos = lambda n: [int(v) // scale * scale for v in np.linspace(0, n - size, grid + 2)[1:-1]]
    return [(y, x) for y in pos(height) for x in pos(width)]


def photo_set(split: str, pcfg: ml_collections.ConfigDict, degradation) -> list[Photo]:
    """The crops (or whole photos, size 0) of the bundled `split` with their degraded inputs.
    Photos in name order and image index i (the degradation's seed) counting the crops, so that
    whole photos get the inputs `python -m cdd_jax.evaluate --hr=DIR` makes from a folder of them
    (benchmarks/heldout_photos.py writes one)."""
    s = int(degradation.scale)
    hrs = []
    for name in sorted(SPLITS[split]):
        image = load_bundled_image(name)
        h, w = image.shape[0] // s * s, image.shape[1] // s * s
        if not pcfg.size:
            hrs.append((name, image[:h, :w]))
            continue
        for y, x in crop_origins(h, w, pcfg.size, pcfg.crop_grid, s):
            hrs.append((f"{name}_y{y}x{x}", image[y:y + pcfg.size, x:x + pcfg.size]))
    return [Photo(name, np.ascontiguousarray(hr), degraded_lr(hr, degradation, pcfg.seed, i))
            for i, (name, hr) in enumerate(hrs)]


def score_photos(photos: Iterable[Photo], methods: Mapping[tuple, Upscale | None], scale: int,
                 lpips=()) -> tuple[list[dict], dict[tuple, list[float]]]:
    """Runs every method on every photo; returns (per-image rows {image, method, sampler, steps,
    metric, value}, wall seconds per method and image: the first includes compilation).
    `methods`: (method, sampler, steps) -> upscale function, or None for the bicubic baseline
    (`bicubic_rgb8`)."""
    per_image: list[dict] = []
    seconds: dict[tuple, list[float]] = {key: [] for key in methods}
    for photo in photos:
        lr = photo.lr.astype(np.float32) / np.float32(255.0)
        for key, upscale in methods.items():
            t0 = time.perf_counter()
            if upscale is None:
                sr = bicubic_rgb8(photo.lr, scale)
            else:
                sr = np.round(upscale(lr) * 255.0).astype(np.uint8)
            seconds[key].append(time.perf_counter() - t0)
            for metric, value in image_metrics(sr, photo.hr, scale, lpips).items():
                per_image.append({"image": photo.name, "method": key[0], "sampler": key[1],
                                  "steps": key[2], "metric": metric, "value": value})
    return per_image, seconds


def result_rows(per_image: list[dict], seconds: Mapping[tuple, list[float]]) -> list[dict]:
    """Rows in the harness's form ({method, sampler, steps, metric, value, stderr (std / sqrt(n)
    over images), seconds_per_image, n_images}) from `score_photos`; seconds_per_image: the mean
    wall time of the images after the first (whose call compiled), of the first alone for one."""
    groups: dict[tuple, list[float]] = {}
    for r in per_image:
        groups.setdefault((r["method"], r["sampler"], r["steps"], r["metric"]), []).append(
            r["value"])
    rows = []
    for (method, sampler, steps, metric), values in groups.items():
        v = np.asarray(values, np.float64)
        stderr = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
        rows.append(dict(method=method, sampler=sampler, steps=steps, metric=metric,
                         value=float(v.mean()), stderr=stderr, n_images=int(v.size),
                         seconds_per_image=_per_image(seconds[(method, sampler, steps)])))
    return rows


def _per_image(seconds: list[float]) -> float:
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


# ----------------------------------------------------------------------------------------------
# The jobs' photo evaluation: methods given as tile samplers, files per split.
# ----------------------------------------------------------------------------------------------


def tile_settings(pcfg: ml_collections.ConfigDict, crop_size: int, scale: int) -> dict:
    """{tile, overlap, tile_batch} of `evaluate.photos` resolved as `cdd_jax.Upscaler` does."""
    tile = int(pcfg.tile or crop_size)
    overlap = default_overlap(tile, scale) if pcfg.overlap < 0 else int(pcfg.overlap)
    batch = pcfg.tile_batch or (len(make_grid(pcfg.size, pcfg.size, tile, overlap, align=scale))
                                if pcfg.size else 16)
    return {"tile": tile, "overlap": overlap, "tile_batch": int(batch)}


def tiled_methods(config: ml_collections.ConfigDict, methods: Mapping[tuple, tuple | None]
                  ) -> dict[tuple, Upscale | None]:
    """Upscale functions through `upscale_tiled` of `methods`: (method, sampler, steps) ->
    (sample(params, cond, rng, noise) as `tiling.tile_sampler` takes it, params), or None for
    bicubic; methods over `evaluate.photos.max_steps` network evaluations are left out."""
    pcfg, scale = config.evaluate.photos, int(config.degradation.scale)
    tiles = tile_settings(pcfg, config.data.crop_size, scale)
    out: dict[tuple, Upscale | None] = {}
    for key, method in methods.items():
        if method is None:
            out[key] = None
        elif not pcfg.max_steps or key[2] <= pcfg.max_steps:
            sample, params = method
            # On the host: one device runs the tiles, whatever the training mesh sharded.
            out[key] = functools.partial(_upscale, sample=tile_sampler(sample, tiles["tile"]),
                                         params=jax.device_get(params), scale=scale,
                                         seed=pcfg.seed, **tiles)
    return out


def _upscale(lr: np.ndarray, *, sample, params, scale, seed, tile, overlap, tile_batch):
    return upscale_tiled(lr, sample, params, scale=scale, tile=tile, overlap=overlap,
                         tile_batch=tile_batch, seed=seed)


def protocol_text(config: ml_collections.ConfigDict, split: str) -> str:
    """What the photo rows of `split` are, for the reports."""
    pcfg, scale = config.evaluate.photos, int(config.degradation.scale)
    t = tile_settings(pcfg, config.data.crop_size, scale)
    what = (f"the whole photos (cropped to a multiple of {scale})" if not pcfg.size else
            f"{pcfg.crop_grid}x{pcfg.crop_grid} crop(s) of {pcfg.size} px per photo")
    names = ", ".join(sorted(SPLITS[split]))
    return (f"x{scale}; bundled {split} photos ({names}), {what}; LR made by "
            f"the degradation preset {config.degradation.preset!r} with the generator seeded by "
            f"({pcfg.seed}, image index); every method through the tiled path of "
            f"cdd_jax.Upscaler (tiles of {t['tile']} px, overlap {t['overlap']}, "
            f"{t['tile_batch']} per call, noise seed {pcfg.seed}); " + PROTOCOL)


def evaluate_photos(config: ml_collections.ConfigDict, methods: Mapping[tuple, tuple | None]
                    ) -> dict[str, dict]:
    """Each split of `evaluate.photos.splits`: {"rows" (`result_rows`), "per_image",
    "seconds" (wall seconds per method over the split, compilation included), "protocol"}."""
    from cdd_jax.evaluate.metrics import LPIPS

    pcfg, scale = config.evaluate.photos, int(config.degradation.scale)
    lpips = [LPIPS(m.split("_", 1)[1]) for m in config.evaluate.metrics if m.startswith("lpips_")]
    upscales = tiled_methods(config, methods)
    out = {}
    for split in pcfg.splits:
        photos = photo_set(split, pcfg, config.degradation)
        per_image, seconds = score_photos(photos, upscales, scale, lpips)
        out[split] = {"rows": result_rows(per_image, seconds), "per_image": per_image,
                      "seconds": [{"method": k[0], "sampler": k[1], "steps": k[2],
                                   "seconds": float(sum(v)), "first_image": float(v[0])}
                                  for k, v in seconds.items()],
                      "protocol": protocol_text(config, split)}
        note("photos %s: %d images, %s", split, len(photos),
                     ", ".join(f"{k[0]}/{k[1]}/{k[2]} {sum(v):.1f} s" for k, v in seconds.items()))
    return out


def write_photo_files(out_dir: str, split: str, result: dict, title: str) -> list[str]:
    """<out_dir>/photos_<split>.json ({rows, seconds, protocol}), .md and _per_image.csv."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"photos_{split}")
    with open(stem + ".json", "w") as f:
        json.dump({k: result[k] for k in ("rows", "seconds", "protocol")}, f, indent=1)
    seconds = "; ".join(f"{s['method']}/{s['sampler']}/{s['steps']} {s['seconds']:.1f}"
                        for s in result["seconds"])
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}: {split} photos\n\n{markdown_table(result['rows'])}\n\n"
                "NFE = network evaluations per image; values are means over images (± standard "
                "error of the mean); s / image = wall time per image after the first (whose call "
                f"compiled).\n\nProtocol: {result['protocol']}.\n\nWall seconds per method "
                f"over the split, compilation included: {seconds}.\n")
    with open(stem + "_per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "method", "sampler", "steps", "metric",
                                               "value"])
        writer.writeheader()
        writer.writerows(result["per_image"])
    return [stem + ".json", stem + ".md", stem + "_per_image.csv"]
