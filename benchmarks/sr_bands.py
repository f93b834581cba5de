"""Where a super-resolution result loses PSNR: the low band an 8 px input can carry vs the rest.

lp(x) = area-downsample by the SR factor, then bicubic upsample (`cdd_jax.models.control.lowpass`,
the anchor's low-pass); the high band is x - lp(x). On the held-out evaluation set of a finished
`configs/sr.py` run (its workdir: config_sr.json and distill/ checkpoints) this scores bicubic,
the student at K steps, their low bands, and mixtures "low band of the ground truth + high band
of the output" (what the output would score if its low band were perfect). It also checks the
input for a misalignment (best integer shift of the ground truth against the bicubic input) and
a global colour bias (affine fit), which would be cheap to fix if present.

    python benchmarks/sr_bands.py --workdir=/work/runs/sr4 [--steps=1,4] [--seed=0]

Writes benchmarks/results/sr_bands.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def best_shift(cond, image, max_shift: int = 2) -> dict:
    """MSE of the bicubic input against the ground truth rolled by (dy, dx), borders cropped."""
    import numpy as np

    m = max_shift + 2
    out = {}
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            rolled = np.roll(image, (dy, dx), axis=(1, 2))[:, m:-m, m:-m]
            out[(dy, dx)] = float(np.mean((cond[:, m:-m, m:-m] - rolled) ** 2))
    best = min(out, key=out.get)
    return {"best_shift": list(best), "best_mse": out[best], "mse_at_zero": out[(0, 0)]}


def input_checks(cond, image, lp) -> dict:
    """Low-band error of the bicubic input, its best affine colour fit and best integer shift."""
    import numpy as np

    c_low, g_low = np.asarray(lp(cond)), np.asarray(lp(image))
    slope, intercept = np.polyfit(c_low.ravel(), g_low.ravel(), 1)
    checks = {
        "low_band_mse": float(np.mean((c_low - g_low) ** 2)),
        "low_band_mean_bias_per_channel": np.mean(c_low - g_low, axis=(0, 1, 2)).tolist(),
        "affine_fit": [float(slope), float(intercept)],
        "low_band_mse_after_affine_fit": float(np.mean((slope * c_low + intercept - g_low) ** 2)),
        **best_shift(cond, image),
    }
    return checks


def markdown(args, rows: list[tuple[str, dict]], checks: dict, num_images: int,
             factor: int) -> str:
    """The results page."""
    return "\n".join(
        [
            "# PSNR by frequency band (held-out crops of an SR run)",
            "",
            f"Run: `{args.workdir}`; {num_images} held-out crops; lp = area-down x{factor} "
            "then bicubic up; sampling seed "
            f"{args.seed}. Command: `python benchmarks/sr_bands.py --workdir={args.workdir}`.",
            "",
            common.md_table(
                ["image", "PSNR (dB)", "LPIPS-Alex"],
                [[n, f"{r['psnr']:.2f}", f"{r['lpips_alex']:.4f}"] for n, r in rows],
            ),
            "",
            f"Input checks: low-band MSE of the input {checks['low_band_mse']:.4f} ([-1, 1] "
            "scale); after the best global affine colour fit "
            f"{checks['low_band_mse_after_affine_fit']:.4f}; "
            f"best integer shift of the ground truth {tuple(checks['best_shift'])} gives MSE "
            f"{checks['best_mse']:.4f} vs {checks['mse_at_zero']:.4f} unshifted.",
            "",
        ]
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="A finished configs/sr.py run.")
    p.add_argument("--steps", default="1,4", help="Student step counts K.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cdd_jax.distill.sampling import few_step_sample
    from cdd_jax.evaluate.metrics import MetricSuite
    from cdd_jax.models.control import lowpass

    run = common.load_sr_run(args.workdir)
    cfg, params, eval_set = run["config"], run["params"], run["eval_set"]
    apply_fn, schedule = run["apply_fn"], run["schedule"]
    factor = int(cfg.degradation.scale)
    cond, image = jnp.asarray(eval_set["cond"]), np.asarray(eval_set["image"])
    metrics = MetricSuite(("psnr", "lpips_alex"))

    def lp(x):
        return lowpass(jnp.asarray(x), factor)

    rows: list[tuple[str, dict]] = []

    def score(name, x):
        m = metrics(np.clip(np.asarray(x), -1, 1), image)
        row = {k: float(np.mean(v)) for k, v in m.items()}
        rows.append((name, row))
        print(f"{name:45s} PSNR {row['psnr']:6.2f}  LPIPS {row['lpips_alex']:.4f}", flush=True)

    score("bicubic c", cond)
    score("lp(c)", lp(cond))
    score("lp(ground truth)", lp(image))
    score("lp(ground truth) + high band of c", lp(image) + cond - lp(cond))
    for k in (int(s) for s in args.steps.split(",") if s):
        sample = jax.jit(
            lambda c, r, k=k: few_step_sample(apply_fn, params, c, r, schedule=schedule,
                                              num_steps=k)
        )
        x = sample(cond, jax.random.key(args.seed))
        score(f"student K={k}", x)
        score(f"student K={k}, low band only", lp(x))
        score(f"lp(ground truth) + high band of K={k}", lp(image) + x - lp(x))

    checks = input_checks(np.asarray(cond), image, lp)
    payload = {
        "machine": common.machine_info(),
        "args": vars(args),
        "rows": dict(rows),
        "input_checks": checks,
        "num_images": int(image.shape[0]),
    }
    md = markdown(args, rows, checks, int(image.shape[0]), factor)
    common.write_results("sr_bands", payload, md, args.out_dir)


if __name__ == "__main__":
    main()
