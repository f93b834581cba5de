"""Does the student beat bicubic? Paired differences on the same held-out crops, several seeds.

The job's own results table gives each method's mean ± standard error over crops; those errors
are dominated by how hard each crop is, which both methods share. Here every crop is scored for
bicubic and for the student, the per-crop difference (student - bicubic) is averaged over the
sampling seeds, and its mean over crops is reported with the standard error over crops; "yes"
means the mean is more than two standard errors on the better side, "no" two on the worse
side, "tie" otherwise. Also the spread of the per-seed means, and the fraction of crops the
student wins.

    python benchmarks/sr_paired.py --workdir=RUN [--steps=1,2,4,8] [--renoise=ddim,fresh]
        [--seeds=3]

RUN is a finished `configs/sr.py` workdir (config_sr.json and distill/ checkpoints). Writes
benchmarks/results/sr_paired.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips_alex": False}


def paired_summary(diffs, higher_is_better: bool) -> dict:
    """diffs: [seeds, crops] of student - bicubic. Returns mean, stderr (over crops, of the
    seed-averaged difference), per-seed means, win fraction and a verdict at 2 standard errors."""
    import numpy as np

    diffs = np.asarray(diffs, np.float64)
    per_crop = diffs.mean(axis=0)
    n = per_crop.shape[0]
    mean = float(per_crop.mean())
    stderr = float(per_crop.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    sign = 1.0 if higher_is_better else -1.0
    if sign * mean > 2 * stderr:
        verdict = "yes"
    elif sign * mean < -2 * stderr:
        verdict = "no"
    else:
        verdict = "tie"
    return {
        "mean": mean,
        "stderr": stderr,
        "per_seed_means": [float(m) for m in diffs.mean(axis=1)],
        "win_fraction": float(np.mean(sign * per_crop > 0)),
        "beats_bicubic": verdict,
    }


def markdown(args, payload: dict, names: list[str]) -> str:
    """The results page: one row per (K, renoise), five columns per metric."""
    rows = payload["rows"]
    headers = ["K", "renoise"]
    for m in names:
        headers += [f"{m}", f"{m} student - bicubic", "per-seed means", "crops won", "beats?"]
    table = []
    for row in rows:
        cells = [row["steps"], row["renoise"]]
        for m in names:
            r = row[m]
            cells += [f"{r['value']:.4f}", f"{r['mean']:+.4f} ± {r['stderr']:.4f}",
                      " / ".join(f"{v:+.3f}" for v in r["per_seed_means"]),
                      f"{r['win_fraction']:.0%}", r["beats_bicubic"]]
        table.append(cells)
    return "\n".join([
        "# Student vs bicubic, paired over the same held-out crops",
        "",
        f"Run: `{args.workdir}`; {payload['num_images']} held-out crops; {args.seeds} sampling "
        "seeds per row (the per-crop difference is averaged over seeds; ± is the standard error "
        "over crops; 'beats?' is yes / no at two standard errors, else tie). Bicubic: "
        + ", ".join(f"{m} {payload['bicubic'][m]:.4f}" for m in names)
        + f". Command: `python benchmarks/sr_paired.py --workdir={args.workdir} "
        f"--seeds={args.seeds}`.",
        "",
        common.md_table(headers, table),
        "",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="A finished configs/sr.py run.")
    p.add_argument("--steps", default="1,2,4,8", help="Student step counts K.")
    p.add_argument("--renoise", default="ddim,fresh", help="Re-noising modes (K > 1).")
    p.add_argument("--seeds", type=int, default=3, help="Sampling seeds per row.")
    p.add_argument("--metrics", default="psnr,lpips_alex")
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cdd_jax.distill.sampling import few_step_sample
    from cdd_jax.evaluate.metrics import MetricSuite

    run = common.load_sr_run(args.workdir)
    cond, image = jnp.asarray(run["eval_set"]["cond"]), np.asarray(run["eval_set"]["image"])
    names = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in names if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {sorted(HIGHER_IS_BETTER)}")
    metrics = MetricSuite(tuple(names))
    base = metrics(np.asarray(cond), image)
    rows = []
    combos = []
    for k in (int(s) for s in args.steps.split(",") if s):
        for r in (x for x in args.renoise.split(",") if x):
            if k == 1 and combos and any(c[0] == 1 for c in combos):
                continue  # one step never re-noises: same samples for every mode
            combos.append((k, r))
    for k, renoise in combos:
        sample = jax.jit(lambda c, key, k=k, r=renoise: few_step_sample(
            run["apply_fn"], run["params"], c, key, schedule=run["schedule"], num_steps=k,
            renoise=r))
        per_metric = {m: [] for m in names}
        values = {m: [] for m in names}
        for seed in range(args.seeds):
            scores = metrics(np.clip(np.asarray(sample(cond, jax.random.key(seed))), -1, 1), image)
            for m in names:
                per_metric[m].append(np.asarray(scores[m]) - np.asarray(base[m]))
                values[m].append(float(np.mean(scores[m])))
        row = {"steps": k, "renoise": renoise}
        for m in names:
            row[m] = {"value": float(np.mean(values[m])),
                      **paired_summary(per_metric[m], HIGHER_IS_BETTER[m])}
        rows.append(row)
        print(f"K={k} {renoise:5s} " + "  ".join(
            f"{m} {row[m]['value']:.4f} (diff {row[m]['mean']:+.4f} ± {row[m]['stderr']:.4f}: "
            f"{row[m]['beats_bicubic']})" for m in names), flush=True)

    payload = {
        "machine": common.machine_info(),
        "args": vars(args),
        "bicubic": {m: float(np.mean(base[m])) for m in names},
        "rows": rows,
        "num_images": int(image.shape[0]),
    }
    md = markdown(args, payload, names)
    common.write_results("sr_paired", payload, md, args.out_dir)


if __name__ == "__main__":
    main()
