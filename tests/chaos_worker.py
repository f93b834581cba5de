"""Helper for tests/test_reliability.py: restores checkpoint directories in a FRESH process.

A fresh process matters: tensorstore caches what a process wrote, so a file truncated after the
write can still restore in the writing process but not after a real restart.

    python chaos_worker.py OUT.json DIR [DIR ...]

For each DIR, runs `Checkpointer(DIR).restore_latest` on the small state written by
`reference_state(step)` and records the restored step, whether every value equals the reference
for that step, the data-iterator state, the remaining steps and any error.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def reference_state(step: int) -> dict[str, np.ndarray]:
    """The state saved at `step`: incompressible random values, different for every step."""
    rng = np.random.default_rng(step)
    return {
        "w": rng.normal(size=(96, 96)).astype(np.float32),
        "b": rng.normal(size=(40,)).astype(np.float32),
        "step": np.asarray(step, np.int32),
    }


def _restore(directory: str) -> dict:
    import jax

    from cdd_jax.train.checkpoint import Checkpointer

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
        for k, v in reference_state(0).items()
    }
    ckpt = Checkpointer(directory, keep=10, async_save=False)
    try:
        out = ckpt.restore_latest(abstract)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ckpt.close()
    if out is None:
        return {"step": None}
    step, state, data = out
    want = reference_state(step)
    exact = all(np.array_equal(np.asarray(state[k]), want[k]) for k in want)
    return {
        "step": int(step),
        "exact": bool(exact),
        "data": data,
        "steps_left": sorted(int(n) for n in os.listdir(directory) if n.isdigit()),
        "entries_left": sorted(os.listdir(directory)),
    }


def main(argv: list[str]) -> None:
    out_path, dirs = argv[1], argv[2:]
    results = {d: _restore(d) for d in dirs}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
