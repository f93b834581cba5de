"""Issue 21: does a larger training budget change Table 1's ordering? (one seed, a probe)

Table 1 trains every row for `train.num_steps` = 500 steps. `launch/issue21/table1_budget.sh`
continues one seed's fine-tuned model and CoDi student from their 500-step checkpoints to a larger
budget (the cosine learning-rate schedule is the one of the larger budget, so the continuation
restarts it at that schedule's value for step 500: a warm restart, not a run trained from scratch
at the larger budget) and evaluates them on the same test photos. This script compares the two
budgets image by image on the `--split` photos (default: test):

- each row's change with the budget (long - short), paired by photo;
- CoDi against the fine-tuned model's samplers at each budget (CoDi - other, paired by photo), and
  whether the sign of the mean, i.e. the ordering, changed.

Intervals are 95% Student-t over the photos of one seed (6 test photos), not over seeds: they say
how consistent a difference is across photos, and a one-seed probe cannot say more. CM, GD and
PE-CoDi were not continued (their rows stay at 500 steps in Table 1).

    python benchmarks/table1_budget.py --long=DIR/seed1 [--short=benchmarks/results/table1_v2/seed1]

Copies the long rows' eval.json into benchmarks/results/table1_budget/seed<S>/ (so the report can
be rebuilt from git with `--long=benchmarks/results/table1_budget/seed<S>`) and writes
benchmarks/results/table1_budget/report.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ablate_default_report import METRICS, group_per_image, paired  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORE = os.path.join(RESULTS, "table1_budget")
ROWS = ("finetune", "codi")  # the rows the probe continues
CODI = (("codi", "ddim", 1), ("codi", "ddim", 2), ("codi", "ddim", 4))
OTHERS = (("finetune", "ddim", 4), ("finetune", "dpmpp_2m", 4), ("finetune", "ddim", 200))
LABELS = {("finetune", "ddim", 4): "DDIM-4", ("finetune", "dpmpp_2m", 4): "DPM++-4",
          ("finetune", "ddim", 200): "DDIM-200", ("finetune", "ddim", 8): "DDIM-8",
          ("finetune", "ddim", 20): "DDIM-20", ("finetune", "ddim", 50): "DDIM-50",
          ("codi", "ddim", 1): "CoDi-1", ("codi", "ddim", 2): "CoDi-2",
          ("codi", "ddim", 4): "CoDi-4"}


def read_row(seed_dir: str, row: str, split: str) -> tuple[dict[tuple, dict[str, float]], int]:
    """({(method, sampler, steps, metric): {image: value}}, train.num_steps) of one row's
    eval.json; ValueError naming the file when it or its `split` photo results are missing."""
    path = os.path.join(seed_dir, row, "eval.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: run the row first (launch/issue21/table1_budget.sh)")
    with open(path) as f:
        saved = json.load(f)
    photos = saved.get("photos", {}).get(split)
    if not photos:
        raise ValueError(f"{path} has no {split!r} photo results")
    return group_per_image(photos["per_image"]), int(saved["settings"]["train.num_steps"])


def read_seed(seed_dir: str, split: str) -> tuple[dict[tuple, dict[str, float]], int]:
    values: dict[tuple, dict[str, float]] = {}
    steps = set()
    for row in ROWS:
        v, s = read_row(seed_dir, row, split)
        values.update(v)
        steps.add(s)
    if len(steps) != 1:
        raise ValueError(f"the rows in {seed_dir} were trained for different budgets: {steps}")
    return values, steps.pop()


def mean(v: dict[str, float]) -> float:
    return sum(v.values()) / len(v)


def compare(short: dict, long: dict) -> dict:
    """Per sampler row and metric: both budgets' means and the paired change; per CoDi row and
    fine-tuned sampler: the paired difference at each budget and whether its sign changed."""
    changes = []
    for key in sorted({k[:3] for k in short} & {k[:3] for k in long}):
        for metric, _, _ in METRICS:
            a, b = long[key + (metric,)], short[key + (metric,)]
            changes.append({"row": LABELS.get(key, "/".join(map(str, key))), "metric": metric,
                            "short": mean(b), "long": mean(a), **paired(a, b)})
    versus = []
    for c in CODI:
        for o in OTHERS:
            for metric, _, sign in METRICS:
                at = {name: paired(vals[c + (metric,)], vals[o + (metric,)])
                      for name, vals in (("short", short), ("long", long))}
                better = {name: d["diff"] * sign > 0 for name, d in at.items()}
                versus.append({"codi": LABELS[c], "other": LABELS[o], "metric": metric,
                               "short": at["short"], "long": at["long"],
                               "codi_better_short": better["short"],
                               "codi_better_long": better["long"],
                               "order_changed": better["short"] != better["long"]})
    return {"changes": changes, "versus": versus}


def _fmt(d: dict) -> str:
    return f"{d['diff']:+.3f} ± {d['half_width']:.3f}"


def markdown(result: dict) -> str:
    names = {m: label for m, label, _ in METRICS}
    s, lg, split = result["short_steps"], result["long_steps"], result["split"]
    lines = [
        f"# Table 1 at {s} and {lg} training steps (seed {result['seed']}, {split} photos)",
        "",
        f"The fine-tuned model and the CoDi student of seed {result['seed']} continued from their "
        f"{s}-step checkpoints to {lg} steps (a warm restart of the cosine schedule, "
        "benchmarks/table1_budget.py). ± is the half-width of the 95% t-interval over the "
        f"{result['n_images']} {split} photos of this one seed, paired by photo. LPIPS: lower is "
        "better; Y-PSNR and SSIM-Y: higher is better.",
        "",
        "## Each row's change with the budget",
        "",
        f"| row | metric | {s} steps | {lg} steps | change |",
        "|---|---|---|---|---|",
    ]
    for r in result["changes"]:
        lines.append(f"| {r['row']} | {names[r['metric']]} | {r['short']:.3f} | {r['long']:.3f} "
                     f"| {_fmt(r)} |")
    lines += ["", "## CoDi against the fine-tuned model, at each budget", "",
              f"Difference = CoDi - other. 'Order' says whether CoDi is ahead (by the mean) at "
              f"{s} -> {lg} steps.", "",
              f"| CoDi | other | metric | at {s} steps | at {lg} steps | order |",
              "|---|---|---|---|---|---|"]
    for r in result["versus"]:
        order = "ahead" if r["codi_better_short"] else "behind"
        order += " -> " + ("ahead" if r["codi_better_long"] else "behind")
        if r["order_changed"]:
            order = f"**{order}**"
        lines.append(f"| {r['codi']} | {r['other']} | {names[r['metric']]} | {_fmt(r['short'])} "
                     f"| {_fmt(r['long'])} | {order} |")
    flips = [r for r in result["versus"] if r["order_changed"]]
    lines += ["", f"Order changes: {len(flips)} of {len(result['versus'])} comparisons."]
    for r in flips:
        inside = all(abs(r[b]["diff"]) <= r[b]["half_width"] for b in ("short", "long"))
        lines.append(f"- {r['codi']} vs {r['other']} on {names[r['metric']]}"
                     + (": inside both intervals." if inside else "."))
    return "\n".join(lines)


def store_long(long_dir: str, seed_name: str) -> str:
    """Copies the long rows' eval.json into STORE/<seed_name>/ (atomically per file)."""
    dst = os.path.join(STORE, seed_name)
    if os.path.abspath(long_dir) == os.path.abspath(dst):
        return dst
    for row in ROWS:
        os.makedirs(os.path.join(dst, row), exist_ok=True)
        target = os.path.join(dst, row, "eval.json")
        shutil.copyfile(os.path.join(long_dir, row, "eval.json"), target + ".tmp")
        os.replace(target + ".tmp", target)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", required=True, help="seed directory of the longer-budget rows")
    p.add_argument("--short", default=None,
                   help="seed directory of the 500-step rows (default: the stored Table 1 seed)")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    seed_name = os.path.basename(os.path.normpath(args.long))
    if not seed_name.startswith("seed"):
        raise SystemExit(f"--long must be a seed directory (DIR/seed<S>), got {args.long}")
    short_dir = args.short or os.path.join(RESULTS, "table1_v2", seed_name)
    try:
        short, s_steps = read_seed(short_dir, args.split)
        long, l_steps = read_seed(args.long, args.split)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if l_steps <= s_steps:
        raise SystemExit(f"--long ({l_steps} steps) must have a larger budget than --short "
                         f"({s_steps} steps)")
    store_long(args.long, seed_name)
    result = {"seed": int(seed_name[4:]), "split": args.split, "short_steps": s_steps,
              "long_steps": l_steps,
              "short": os.path.relpath(short_dir, os.path.dirname(os.path.dirname(RESULTS))),
              "n_images": len(next(iter(long.values()))), **compare(short, long)}
    write_results("report", result, markdown(result), out_dir=STORE)
    print(markdown(result))


if __name__ == "__main__":
    main()
