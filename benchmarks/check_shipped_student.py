"""Does the shipped student, loaded alone (no training config, no workdir), reproduce the
evaluation numbers its job recorded?

    python benchmarks/check_shipped_student.py [--model=DIR] [--out=DIR]

The same check as `python -m cdd_jax.evaluate --heldout` (`cdd_jax.inference.reproduce`), kept
for the scripts and notes that cite it. Prints one JSON line; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="student folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="where the re-evaluation writes (default: tmp)")
    args = ap.parse_args(argv)

    from cdd_jax.inference.reproduce import reproduce_job_evaluation
    from cdd_jax.inference.student import load_student

    out = args.out or tempfile.mkdtemp(prefix="shipped_student_")
    report = reproduce_job_evaluation(load_student(args.model), out)
    print(json.dumps({"rows": report["rows"], "identical": report["identical"],
                      "first_difference": report["differences"][:1]}))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
