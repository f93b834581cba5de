"""Issue 21: which deviations of the default SR job does the validation split keep?

Reads the runs of `launch/issue21/ablate_default.sh` (benchmarks/results/ablate_default/: each
run's per-image photo values on the 8 validation crops of 128 px) and compares each ablation with
the baseline crop by crop: the mean paired difference (ablation - baseline) over the crops and its
95% Student-t interval. The 8 crops are 2x2 grids of two photos, so they are not independent and
the interval is optimistic; it says how consistent a difference is across crops, not a test.

The rule, fixed before the runs were scored: the paper reports LPIPS, so the deciding number is
the mean LPIPS-Alex of the exported sampler (`evaluate.default_renoise` at K = 4) on validation.
A deviation is kept when removing it makes that mean worse (higher); otherwise it is dropped.
Y-PSNR and SSIM-Y are shown beside it. The sampler deviation ("fresh" re-noising) needs no run of
its own: every run scores both samplers, and the baseline's K = 4 "fresh" and "ddim" rows are
compared the same way.

    python benchmarks/ablate_default_report.py [--base=base_shipped]

Writes benchmarks/results/ablate_default/report.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from cdd_jax.evaluate.seeds import t_interval  # noqa: E402

STORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ablate_default")
ABLATIONS = {  # run name -> the deviation it removes
    "no_anchor": "low-frequency anchor (control.anchor_precision 4 -> 0)",
    "lambda1": "lambda = 100 (distill.lambda_x 100 -> 1, the paper's)",
    "no_shuffle": "channel shuffle (degradation.channel_shuffle_prob 0.5 -> 0)",
}
METRICS = (("lpips_alex", "LPIPS-Alex", -1), ("psnr_y", "Y-PSNR (dB)", 1), ("ssim_y", "SSIM-Y", 1))
DECIDING = ("codi", "fresh-uniform", 4, "lpips_alex")
SHOWN = (("codi", "fresh-uniform", 4), ("codi", "ddim-uniform", 4), ("codi", "ddim-uniform", 1))


def group_per_image(records) -> dict[tuple, dict[str, float]]:
    """{(method, sampler, steps, metric): {image: value}} of per-image records (dicts with those
    keys, as in a per-image CSV or a photo result's `per_image` list)."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        out[(r["method"], r["sampler"], int(r["steps"]), r["metric"])][r["image"]] = float(
            r["value"])
    return out


def read_per_image(path: str) -> dict[tuple, dict[str, float]]:
    """{(method, sampler, steps, metric): {image: value}} of one run's per-image CSV."""
    with open(path, newline="") as f:
        return group_per_image(csv.DictReader(f))


def paired(a: dict[str, float], b: dict[str, float]) -> dict:
    """Mean of a - b over the images both hold, with its t-interval half-width."""
    images = sorted(a.keys() & b.keys())
    if len(images) != len(a) or len(images) != len(b):
        raise ValueError(f"the runs were scored on different images: {sorted(a)} vs {sorted(b)}")
    mean, half = t_interval([a[i] - b[i] for i in images])
    return {"diff": mean, "half_width": half, "n_images": len(images)}


def compare(runs: dict[str, dict], base: str) -> dict:
    """Per ablation and shown sampler row: the baseline's mean, the ablation's, the paired
    difference per metric; the verdict on the deciding number."""
    b = runs[base]
    result: dict = {"base": base, "rule": __doc__.split("The rule, ")[1].split("\n\n")[0].strip(),
                    "ablations": {}, "sampler": {}}
    for name, what in ABLATIONS.items():
        if name not in runs:
            continue
        rows = []
        for key in SHOWN:
            for metric, _, _ in METRICS:
                a_vals, b_vals = runs[name][key + (metric,)], b[key + (metric,)]
                d = paired(a_vals, b_vals)
                rows.append({"method": key[0], "sampler": key[1], "steps": key[2],
                             "metric": metric, "base": sum(b_vals.values()) / len(b_vals),
                             "ablation": sum(a_vals.values()) / len(a_vals), **d})
        deciding = next(r for r in rows if (r["method"], r["sampler"], r["steps"], r["metric"])
                        == DECIDING)
        keep = deciding["diff"] > 0  # removing the deviation raised (worsened) LPIPS
        result["ablations"][name] = {"removes": what, "rows": rows, "keep": keep}
    fresh = DECIDING[:3]
    ddim = (DECIDING[0], "ddim-uniform", DECIDING[2])
    result["sampler"] = {
        m: paired(b[ddim + (m,)], b[fresh + (m,)]) for m, _, _ in METRICS}  # ddim - fresh
    result["sampler"]["keep_fresh"] = result["sampler"]["lpips_alex"]["diff"] > 0
    return result


def markdown(result: dict) -> str:
    lines = [
        "# The default SR job's deviations, re-justified on the validation photos (issue 21)",
        "",
        f"Baseline: `{result['base']}`. Each ablation is the default job (`configs/sr.py`, 1500 "
        "steps) with one deviation removed, trained from scratch and scored on the 8 validation "
        "crops of 128 px (2x2 grid on coffee and flower). Differences are ablation - baseline, "
        "paired by crop, mean ± half-width of the 95% t-interval over the 8 crops (not "
        "independent: neighbouring crops of one photo).",
        "",
        f"Rule: {result['rule']}",
        "",
        "| removed | row | metric | baseline | ablation | difference | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    names = {m: label for m, label, _ in METRICS}
    for ab in result["ablations"].values():
        for r in ab["rows"]:
            deciding = (r["method"], r["sampler"], r["steps"], r["metric"]) == DECIDING
            verdict = ("**keep**" if ab["keep"] else "**drop**") if deciding else ""
            lines.append(
                f"| {ab['removes']} | {r['sampler']} K={r['steps']} | {names[r['metric']]} | "
                f"{r['base']:.4f} | {r['ablation']:.4f} | {r['diff']:+.4f} ± "
                f"{r['half_width']:.4f} | {verdict} |")
    s = result["sampler"]
    lines += ["", "Sampler (baseline run, K = 4): DDIM - fresh, paired by crop: " + "; ".join(
        f"{names[m]} {s[m]['diff']:+.4f} ± {s[m]['half_width']:.4f}" for m, _, _ in METRICS)
        + f". Verdict: {'keep' if s['keep_fresh'] else 'drop'} \"fresh\".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="base_shipped",
                    help="baseline run name (base_shipped: the shipped student; base: retrained)")
    ap.add_argument("--store", default=STORE)
    args = ap.parse_args()
    runs = {}
    for f in sorted(os.listdir(args.store)):
        if f.endswith(".per_image.csv"):
            runs[f[: -len(".per_image.csv")]] = read_per_image(os.path.join(args.store, f))
    if args.base not in runs:
        raise SystemExit(f"no {args.base}.per_image.csv in {args.store}")
    result = compare(runs, args.base)
    text = markdown(result)
    write_results("report", result, text, out_dir=args.store)
    print(text)


if __name__ == "__main__":
    main()
