"""Does the shipped student, loaded alone (no training config, no workdir), reproduce the
evaluation numbers its job recorded?

    python benchmarks/check_shipped_student.py [--model=DIR] [--out=DIR]

Loads the student folder (default: `cdd_jax/assets/student`) with `cdd_jax.inference.student`,
rebuilds the job's held-out crops from the saved config, evaluates exactly as the job did
(`cdd_jax.evaluate.sr.evaluate_sr`) and compares every metric with `student.json` (timings
aside). Prints one JSON line; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="student folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="where the re-evaluation writes (default: tmp)")
    args = ap.parse_args(argv)

    from cdd_jax.evaluate.sr import evaluate_sr
    from cdd_jax.inference.student import load_student
    from cdd_jax.stages.sr import make_sr_eval_set

    student = load_student(args.model)
    out = args.out or tempfile.mkdtemp(prefix="shipped_student_")
    rows = evaluate_sr(student.config, out, student.apply_fn, student.params, student.schedule,
                       make_sr_eval_set(student.config))

    def strip(rs):
        return [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in rs]

    recorded = strip(student.info["metrics"])
    again = strip(json.loads(json.dumps(rows)))
    diffs = [(a, b) for a, b in zip(recorded, again, strict=False) if a != b]
    same = len(recorded) == len(again) and not diffs
    print(json.dumps({"rows": len(again), "identical": same, "first_difference": diffs[:1]}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
