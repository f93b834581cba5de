"""Figures for evaluation reports: a labelled image grid and quality-versus-NFE plots.

Matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
switch), so this works headless and does not disturb a caller's backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_LABEL_HEIGHT = 16  # pixels of the label band above the grid
_PAD = 4  # pixels between cells and around the border


def grid_size(n_rows: int, n_cols: int, cell_h: int, cell_w: int, pad: int = _PAD) -> tuple:
    """(height, width) in pixels of the grid `image_grid` draws for these dimensions."""
    height = _LABEL_HEIGHT + n_rows * cell_h + (n_rows + 1) * pad
    width = n_cols * cell_w + (n_cols + 1) * pad
    return height, width


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _fit_label(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """Truncates `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(
    columns: Mapping[str, np.ndarray],
    path: str,
    *,
    upscale: int = 4,
    pad: int = _PAD,
) -> np.ndarray:
    """Writes a PNG grid: one labelled column per entry of `columns`, one row per example.

    Each value is [N, H, W, 3] in [-1, 1]; all columns need the same N but may differ in size
    (e.g. the 8x8 low-quality input next to 32x32 outputs). Every image is enlarged with
    nearest-neighbour interpolation to a cell of (largest H, largest W) x `upscale`, so small
    crops stay visible and pixels stay sharp. Returns the grid as a uint8 [height, width, 3] array
    (its size is `grid_size(N, len(columns), cell_h, cell_w, pad)`).
    """
    if not columns:
        raise ValueError("image_grid: no columns")
    if not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"image_grid: upscale must be a positive int, got {upscale!r}")
    arrays = {}
    for label, x in columns.items():
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"image_grid: column {label!r} must be [N, H, W, 3], got {x.shape}")
        arrays[label] = x
    counts = {label: x.shape[0] for label, x in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"image_grid: columns hold different numbers of images: {counts}")
    n_rows = next(iter(counts.values()))
    cell_h = max(x.shape[1] for x in arrays.values()) * upscale
    cell_w = max(x.shape[2] for x in arrays.values()) * upscale
    height, width = grid_size(n_rows, len(arrays), cell_h, cell_w, pad)

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, (label, x) in enumerate(arrays.items()):
        left = pad + j * (cell_w + pad)
        draw.text((left, 2), _fit_label(draw, font, str(label), cell_w), fill=(0, 0, 0), font=font)
        for i, img in enumerate(_to_uint8(x)):
            tile = Image.fromarray(img).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left, _LABEL_HEIGHT + pad + i * (cell_h + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return np.asarray(canvas)


_YLABELS = {
    "psnr": "PSNR (dB), higher is better",
    "ssim": "SSIM, higher is better",
    "psnr_y": "Y-PSNR (dB), higher is better",
    "ssim_y": "SSIM on Y, higher is better",
    "lpips_alex": "LPIPS-Alex, lower is better",
    "lpips_vgg": "LPIPS-VGG, lower is better",
}


def plot_quality_vs_nfe(
    rows: Sequence[dict],
    path: str,
    metrics: Sequence[str] = ("lpips_alex", "psnr"),
    *,
    title: str | None = None,
) -> str:
    """Writes a PNG with one panel per metric: value against network evaluations (log x).

    Each (method, sampler) is one line with markers over its step counts; methods without
    network evaluations (steps == 0, e.g. bicubic) are drawn as dashed horizontal references.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if not metrics:
        raise ValueError("plot_quality_vs_nfe: no metrics requested")
    present = {row["metric"] for row in rows}
    missing = [m for m in metrics if m not in present]
    if missing:
        raise ValueError(
            f"plot_quality_vs_nfe: no rows for metrics {missing}; have {sorted(present)}"
        )

    fig = Figure(figsize=(5.0 * len(metrics), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for row in rows:
            if row["metric"] == metric:
                series.setdefault((row["method"], row["sampler"]), []).append(
                    (int(row["steps"]), float(row["value"]))
                )
        all_steps: set[int] = set()
        for style, ((method, sampler), points) in enumerate(series.items()):
            label = method if sampler in ("", "none") else f"{method} ({sampler})"
            color = f"C{style % 10}"
            refs = [v for s, v in points if s == 0]
            for v in refs:
                ax.axhline(v, linestyle="--", color=color, label=f"{label}, no network")
            points = sorted((s, v) for s, v in points if s > 0)
            if points:
                steps, values = zip(*points, strict=True)
                all_steps.update(steps)
                ax.plot(steps, values, marker="o", color=color, label=label)
        if all_steps:  # log axis, ticks at the step counts actually evaluated, plain numbers
            ax.set_xscale("log")
            ax.set_xticks(sorted(all_steps))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel(_YLABELS.get(metric, metric))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def tile_images(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """[N, H, W, 3] in [-1, 1] -> one uint8 image of the N images in rows of `cols`
    (default: a near-square grid), unlabelled and at native size."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = np.round(
            (np.clip(im, -1, 1) + 1) * 127.5).astype(np.uint8)
    return grid
