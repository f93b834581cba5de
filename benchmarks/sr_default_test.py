"""Issue 21, acceptance 2: the default SR job's student on the test photos, at 128 px.

The settings of the default job (low-frequency anchor, lambda = 100, channel shuffle, "fresh"
re-noising for the exported sampler) were each re-checked on the validation photos
(`benchmarks/ablate_default_report.py`); this scores the student those settings give (default:
the shipped one, `cdd_jax/assets/student`) on the test photos, which nothing was chosen on: a
`crop_grid` x `crop_grid` grid of 128 px crops per photo through the jobs' photo evaluation
(`benchmarks/photo_eval_cost.py`, the Upscaler's tiled path), and every student row compared
with bicubic crop by crop (mean paired difference, 95% t-interval over the crops; neighbouring
crops of one photo are not independent, so the interval is optimistic).

    python benchmarks/sr_default_test.py [--model=DIR] [--crop_grid=2]

Writes benchmarks/results/sr_default_test/{photos_test.md,photos_test.json,
photos_test_per_image.csv,report.json,report.md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import photo_eval_cost  # noqa: E402
from benchmarks.ablate_default_report import METRICS, paired, read_per_image  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sr_default_test")
BASELINE = ("bicubic", "none", 0)


def against_bicubic(per_image: dict[tuple, dict[str, float]]) -> list[dict]:
    """Every non-bicubic row's paired difference from bicubic, per metric."""
    rows = []
    keys = sorted({k[:3] for k in per_image if k[:3] != BASELINE})
    for key in keys:
        for metric, _, _ in METRICS:
            vals, base = per_image[key + (metric,)], per_image[BASELINE + (metric,)]
            rows.append({"method": key[0], "sampler": key[1], "steps": key[2], "metric": metric,
                         "bicubic": sum(base.values()) / len(base),
                         "value": sum(vals.values()) / len(vals), **paired(vals, base)})
    return rows


def markdown(rows: list[dict], model: str, crop_grid: int) -> str:
    names = {m: label for m, label, _ in METRICS}
    n = rows[0]["n_images"] if rows else 0
    lines = [
        "# The default SR job's student on the test photos (issue 21, acceptance 2)",
        "",
        f"Student: `{model}`. Test photos only, {crop_grid}x{crop_grid} crops of 128 px per "
        f"photo ({n} crops). Difference = student - bicubic, paired by crop, mean ± half-width "
        "of the 95% t-interval over the crops (neighbouring crops of one photo are not "
        "independent). LPIPS: lower is better; Y-PSNR and SSIM-Y: higher is better.",
        "",
        "| row | metric | bicubic | student | difference |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} K={r['steps']} | {names[r['metric']]} | "
                     f"{r['bicubic']:.4f} | {r['value']:.4f} | {r['diff']:+.4f} ± "
                     f"{r['half_width']:.4f} |")
    return "\n".join(lines + [""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="student folder (default: the shipped one)")
    ap.add_argument("--crop_grid", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        photo_eval_cost.main(["--out", tmp, "--splits=test", f"--crop_grid={args.crop_grid}",
                              "--ddim="] + (["--model", args.model] if args.model else []))
        os.makedirs(args.out, exist_ok=True)
        for f in ("photos_test.md", "photos_test.json", "photos_test_per_image.csv"):
            shutil.copy(os.path.join(tmp, f), os.path.join(args.out, f + ".tmp"))
            os.replace(os.path.join(args.out, f + ".tmp"), os.path.join(args.out, f))
    rows = against_bicubic(read_per_image(os.path.join(args.out, "photos_test_per_image.csv")))
    model = args.model or "cdd_jax/assets/student (shipped)"
    text = markdown(rows, model, args.crop_grid)
    write_results("report", {"model": model, "crop_grid": args.crop_grid, "rows": rows}, text,
                  out_dir=args.out)
    print(text)


if __name__ == "__main__":
    main()
