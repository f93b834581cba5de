"""Does an exported student, loaded alone (no training config, no workdir), reproduce the
evaluation numbers its job recorded? The held-out crops are rebuilt from the folder's saved
config and evaluated exactly as the job did (`cdd_jax.evaluate.sr.evaluate_sr`); every metric row
is compared with `student.json` (timings aside).

    python -m cdd_jax.evaluate --heldout --out=DIR [--model=DIR]     # the command line
    reproduce_job_evaluation(load_student(path), out)                 # the API
"""

from __future__ import annotations

import json

from cdd_jax.evaluate.sr import evaluate_sr
from cdd_jax.inference.student import Student
from cdd_jax.stages.sr import make_sr_eval_set


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in rows]


def reproduce_job_evaluation(student: Student, out: str) -> dict:
    """Re-evaluates `student` on its job's held-out crops (results, grid in `out`) and returns
    {"rows", "identical", "differences": [(recorded, again), ...]}."""
    config = student.config.copy_and_resolve_references()
    if "photos" in config.evaluate:  # what student.json records: the held-out crop rows only
        config.evaluate.photos.splits = ()
    rows = evaluate_sr(config, out, student.apply_fn, student.params, student.schedule,
                       make_sr_eval_set(config))
    recorded = _untimed(student.info.get("metrics", []))
    again = _untimed(json.loads(json.dumps(rows)))  # the same float formatting as student.json
    diffs = [(a, b) for a, b in zip(recorded, again, strict=False) if a != b]
    if len(recorded) != len(again):
        diffs.append(({"rows": len(recorded)}, {"rows": len(again)}))
    return {"rows": len(again), "identical": not diffs, "differences": diffs}
