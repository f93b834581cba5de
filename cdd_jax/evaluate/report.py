"""Writers for evaluation results: a JSON list of rows and a markdown table.

A row is {method, sampler, steps, metric, value, seconds_per_image, n_images} (plus optional
"stderr"), as produced by `cdd_jax.evaluate.harness.evaluate_methods`. Non-finite values (PSNR of
identical images is +inf, a one-image stderr is NaN) are written as JSON's de-facto
`Infinity` / `NaN` tokens, which Python's json module reads back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence

REQUIRED_KEYS = ("method", "sampler", "steps", "metric", "value", "seconds_per_image", "n_images")

# Column headers for known metrics, with the direction that is better.
_HEADERS = {
    "psnr": "PSNR (dB) ↑",
    "ssim": "SSIM ↑",
    "psnr_y": "PSNR-Y (dB) ↑",
    "ssim_y": "SSIM-Y ↑",
    "lpips_alex": "LPIPS-Alex ↓",
    "lpips_vgg": "LPIPS-VGG ↓",
    "lr_psnr": "LR-consistency PSNR (dB) ↑",
    "lr_mse": "LR-consistency MSE ↓",
}


def _check_rows(rows: Sequence[dict]) -> list[dict]:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"result row {i} is not a dict: {row!r}")
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row {i} lacks keys {missing}: {row!r}")
    return rows


def _fmt(metric: str, value: float, stderr: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    spec = ".2f" if "psnr" in metric else ".2e" if "mse" in metric else ".4f"
    text = f"{value:{spec}}"
    if stderr is not None and math.isfinite(stderr):
        text += f" ± {stderr:{spec}}"
    return text


def markdown_table(rows: Sequence[dict], spread: str = "stderr") -> str:
    """One table row per (method, sampler, steps) in first-seen order; one column per metric;
    each cell "value ± row[spread]" where that is finite (the standard error over images, or
    e.g. "ci95", an interval over seeds)."""
    rows = _check_rows(rows)
    groups: dict[tuple, dict] = {}
    metrics: list[str] = []
    for row in rows:
        ident = (row["method"], row["sampler"], row["steps"])
        group = groups.setdefault(
            ident, {"cells": {}, "seconds": row["seconds_per_image"], "n": row["n_images"]}
        )
        if row["metric"] in group["cells"]:
            raise ValueError(f"duplicate result for {ident} metric {row['metric']!r}")
        group["cells"][row["metric"]] = _fmt(row["metric"], row["value"], row.get(spread))
        if row["metric"] not in metrics:
            metrics.append(row["metric"])
    header = ["method", "sampler", "NFE"] + [_HEADERS.get(m, m) for m in metrics]
    header += ["s / image", "images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, sampler, steps), group in groups.items():
        cells = [str(method), str(sampler), str(steps)]
        cells += [group["cells"].get(m, "—") for m in metrics]
        cells += [f"{group['seconds']:.4g}", str(group["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    rows: Iterable[dict],
    out_dir: str,
    title: str,
    *,
    stem: str = "results",
    notes: str | None = None,
    spread: str = "stderr",
    spread_text: str = "means over images (± standard error of the mean)",
) -> tuple[str, str]:
    """Writes `<out_dir>/<stem>.json` (the rows) and `<out_dir>/<stem>.md`; returns both paths.

    The markdown has the title, the table (value ± row[spread] where known; `spread_text` says
    what the values and the ± are) and `notes` (e.g. the command, the timing device, what NFE
    counts).
    """
    rows = _check_rows(rows)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{stem}.json")
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump([dict(r) for r in rows], f, indent=1)
    text = f"# {title}\n\n{markdown_table(rows, spread)}\n"
    text += (
        f"\nNFE = network evaluations per image; values are {spread_text}; s / image = "
        "wall-clock sampling time per image, compilation excluded.\n"
    )
    if notes:
        text += f"\n{notes.strip()}\n"
    with open(md_path, "w") as f:
        f.write(text)
    return json_path, md_path


def load_results(path: str) -> list[dict]:
    """Reads rows written by `write_results` (the .json file) and checks their keys."""
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return _check_rows(rows)
