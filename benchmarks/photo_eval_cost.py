"""What the jobs' photo evaluation (`evaluate.photos`, issue 21) costs, measured on a student
folder (default: the shipped student) through the jobs' own code path: the student's rows of
the sr job (bicubic, each K and re-noising), plus DDIM at a few step counts of the same network
as a stand-in for the Table 1 rows' many-step samplers (the fine-tuned model has the same
architecture), from which the cost per network evaluation is fitted.

    python benchmarks/photo_eval_cost.py --out=/tmp/photo_cost [--model=DIR] \\
        [--splits=validation,test] [--size=128] [--ddim=8,20]

Writes <out>/photos_<split>.{json,md,_per_image.csv} (`evaluate.photos.write_photo_files`) and
<out>/cost.json; prints seconds per method per split. The metric values are the shipped
student's on the photos, NOT a published result (docs/RESULTS.md is written from the re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="student folder (default: the shipped one)")
    ap.add_argument("--splits", default="validation,test")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crop_grid", type=int, default=1)
    ap.add_argument("--ddim", default="8,20", help="DDIM step counts of the stand-in ('' none)")
    args = ap.parse_args(argv)
    import numpy as np

    from cdd_jax.evaluate.harness import timing_device
    from cdd_jax.evaluate.photos import evaluate_photos, photo_set, write_photo_files
    from cdd_jax.evaluate.sr import student_photo_methods
    from cdd_jax.evaluate.table1 import row_sample
    from cdd_jax.inference.student import load_student

    t0 = time.perf_counter()
    student = load_student(args.model)
    config = student.config
    config.evaluate.photos.update(splits=tuple(args.splits.split(",")), size=args.size,
                                  crop_grid=args.crop_grid)
    methods = student_photo_methods(config, student.apply_fn, student.params, student.schedule)
    for n in [int(x) for x in args.ddim.split(",") if x]:
        methods[("ddim_standin", "ddim", n)] = (
            row_sample(config, "finetune", "ddim", n, student.apply_fn, student.schedule),
            student.params)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_photos(config, methods)
    total_s = time.perf_counter() - t0
    cost = {"device": timing_device(), "host": platform.node(), "cpus": os.cpu_count(),
            "load_average_after": os.getloadavg(), "student": student.path,
            "load_seconds": load_s, "evaluate_seconds": total_s, "splits": {}}
    for split, result in results.items():
        write_photo_files(args.out, split, result, "Photo evaluation cost run")
        n_images = len(photo_set(split, config.evaluate.photos, config.degradation))
        cost["splits"][split] = {"n_images": n_images, "methods": result["seconds"]}
        print(f"{split} ({n_images} images): " + "; ".join(
            f"{s['method']}/{s['sampler']}/{s['steps']} {s['seconds']:.1f} s (first image "
            f"{s['first_image']:.1f} s)" for s in result["seconds"]))
    # Seconds per network evaluation and image (compilation excluded: images after the first).
    per = {}
    for split, result in results.items():
        for s in result["seconds"]:
            n = cost["splits"][split]["n_images"]
            if s["steps"] and n > 1:
                per.setdefault(split, []).append(
                    (s["steps"], (s["seconds"] - s["first_image"]) / (n - 1)))
    for split, pts in per.items():
        steps, secs = np.array(pts, float).T
        slope, intercept = np.polyfit(steps, secs, 1)
        cost["splits"][split]["fit_seconds_per_image"] = {"per_nfe": slope, "fixed": intercept}
        print(f"{split}: {slope:.3f} s per network evaluation and image + {intercept:.3f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost.json"), "w") as f:
        json.dump(cost, f, indent=1)
    print(f"load {load_s:.1f} s, evaluation {total_s:.1f} s; {args.out}/cost.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
