"""Full-image evaluation of a student through the tiled path, by the SR papers' protocol
(`cdd_jax.evaluate.protocol`): bicubic and the student at each K on a folder of high-resolution
images, degraded with the student's own degradation preset and a fixed seed (whole images, not
crops), or on a paired LR/HR folder. Writes per_image.csv, summary.json, summary.md. The per-image
work is `cdd_jax.evaluate.photos.score_photos`, the same as the jobs' photo evaluation."""

from __future__ import annotations

import csv
import functools
import json
import os

import numpy as np
from tqdm.auto import tqdm

from cdd_jax.evaluate.photos import Photo, degraded_lr, score_photos
from cdd_jax.evaluate.protocol import PROTOCOL, summarise
from cdd_jax.inference.images import EXTENSIONS, read_image


def _rgb8(array: np.ndarray) -> np.ndarray:
    """uint8 RGB of a read image (grey replicated, alpha dropped, 16 bits rounded)."""
    if array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    colour = array[..., :3] if array.shape[2] >= 3 else np.repeat(array[..., :1], 3, axis=2)
    return np.ascontiguousarray(colour)


def image_pairs(hr_dir: str, lr_dir: str | None) -> list[tuple[str, str, str | None]]:
    """(name, HR path, LR path or None) for every image of `hr_dir`, LR matched by file stem."""
    names = sorted(n for n in os.listdir(hr_dir) if os.path.splitext(n)[1].lower() in EXTENSIONS)
    if not names:
        raise ValueError(f"--hr={hr_dir} holds no PNG/JPEG/WebP/BMP/TIFF images")
    lr_by_stem = {}
    if lr_dir:
        lr_by_stem = {os.path.splitext(n)[0]: os.path.join(lr_dir, n) for n in os.listdir(lr_dir)
                      if os.path.splitext(n)[1].lower() in EXTENSIONS}
    pairs = []
    for name in names:
        stem = os.path.splitext(name)[0]
        if lr_dir and stem not in lr_by_stem:
            raise ValueError(f"no low-resolution image named {stem}.* in --lr={lr_dir}")
        pairs.append((stem, os.path.join(hr_dir, name), lr_by_stem.get(stem)))
    return pairs


def load_pair(hr_path: str, lr_path: str | None, scale: int, degradation, seed: int,
              index: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR cropped to a multiple of `scale`, LR), both uint8 RGB. Without `lr_path` the LR is
    the HR degraded by `degradation` with the generator seeded by (seed, index)."""
    hr = _rgb8(read_image(hr_path)[0])
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    if h == 0 or w == 0:
        raise ValueError(f"{hr_path}: smaller than the scale {scale}")
    hr = hr[:h, :w]
    if lr_path is None:
        return hr, degraded_lr(hr, degradation, seed, index)
    lr = _rgb8(read_image(lr_path)[0])
    if (lr.shape[0] * scale, lr.shape[1] * scale) != (h, w):
        raise ValueError(f"{lr_path}: {lr.shape[1]}x{lr.shape[0]} is not the HR size "
                         f"{w}x{h} / {scale} (paired folders must be aligned)")
    return hr, lr


def evaluate_folder(upscaler, hr_dir: str, out_dir: str, *, lr_dir: str | None = None,
                    steps=(1, 4), seed: int = 0, lpips_net: str | None = "alex",
                    progress: bool = False) -> list[dict]:
    """Evaluates bicubic and the student at each K of `steps` (`photos.score_photos`, the
    jobs' photo evaluation); returns the summary rows."""
    student, scale = upscaler.student, upscaler.scale
    lpips = None
    if lpips_net:
        from cdd_jax.evaluate.metrics import LPIPS

        lpips = LPIPS(lpips_net)
    pairs = image_pairs(hr_dir, lr_dir)
    photos = (Photo(name, *load_pair(hr_path, lr_path, scale, student.config.degradation, seed,
                                     index))
              for index, (name, hr_path, lr_path) in enumerate(pairs))
    methods = {("bicubic", "none", 0): None}
    for k in steps:
        methods[("student", upscaler.renoise, k)] = functools.partial(
            upscaler.upscale_rgb, steps=k, seed=seed)
    per_image, _ = score_photos(tqdm(photos, total=len(pairs), unit="image",
                                     disable=not progress), methods, scale, lpips)
    per_image = [{k: v for k, v in r.items() if k != "sampler"} for r in per_image]
    rows = summarise(per_image)
    _write(out_dir, per_image, rows, upscaler, hr_dir, lr_dir, seed)
    return rows


def _write(out_dir, per_image, rows, upscaler, hr_dir, lr_dir, seed) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "per_image.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "method", "steps", "metric", "value"])
        writer.writeheader()
        writer.writerows(per_image)
    info = upscaler.student.info
    lr_text = (f"paired LR images from {lr_dir}" if lr_dir else
               f"LR made from each HR image by the student's degradation preset "
               f"{info['degradation_preset']!r}, seed ({seed}, image index)")
    protocol = (f"x{upscaler.scale}; {lr_text}; HR cropped to a multiple of the scale; tiles of "
                f"{upscaler.tile} px, overlap {upscaler.overlap}, renoise {upscaler.renoise}, "
                f"noise seed {seed}; " + PROTOCOL)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"rows": rows, "protocol": protocol, "hr": os.path.abspath(hr_dir),
                   "student": upscaler.student.path}, f, indent=2)
    metrics = sorted({r["metric"] for r in rows})
    methods = sorted({(r["method"], r["steps"]) for r in rows})
    table = {(r["method"], r["steps"], r["metric"]): r for r in rows}
    lines = [f"# Full-image evaluation ({len({p['image'] for p in per_image})} images)", "",
             f"Protocol: {protocol}.", "", "| method | K | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for method, k in methods:
        cells = [f"{table[(method, k, m)]['value']:.4f} ± {table[(method, k, m)]['stderr']:.4f}"
                 for m in metrics]
        lines.append(f"| {method} | {k or '-'} | " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
