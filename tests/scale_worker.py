"""Runs the real command line (`cdd_jax.main`) in a fresh process and records what it restores.

    python tests/scale_worker.py DUMP.npz --config=configs/pretrain.py:tiny --workdir=... [flags]

(DUMP.npz "-": record nothing.)

Used by tests/test_scale.py for the one-device reference runs and for a job that resumes on a
machine with another device count (the test sets XLA_FLAGS). The only addition to the plain
command line: when the training loop restores a checkpoint, the restored train state (every leaf,
as numpy), the sharding spec each leaf was placed with, the mesh shape and the restored step are
saved to DUMP.npz before training goes on. Two switches (environment variables) save compile
time without touching the training: SCALE_WORKER_NO_EVAL=1 drops the job's evaluation and sample
hooks (they read the state, never change it); SCALE_WORKER_STOP_AFTER_TRAIN=1 exits with 0 as
soon as `loop.train` returns (its final checkpoint and logs are written by then), skipping export
and the evaluation stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np


def _install_hooks(dump_path: str) -> None:
    import jax

    from cdd_jax.stages import distill, pretrain
    from cdd_jax.train import checkpoint, loop

    restore_latest = checkpoint.Checkpointer.restore_latest

    def recording_restore(self, abstract_state):
        out = restore_latest(self, abstract_state)
        if out is not None and dump_path != "-":
            step, state, _ = out
            flat = jax.tree_util.tree_flatten_with_path(state)[0]
            arrays = {f"leaf{i}": np.asarray(x) for i, (_, x) in enumerate(flat)}
            meta = {
                "step": int(step),
                "paths": [jax.tree_util.keystr(p) for p, _ in flat],
                "specs": [str(x.sharding.spec) for _, x in flat],
                "mesh": {k: int(v) for k, v in flat[0][1].sharding.mesh.shape.items()},
                "devices": jax.device_count(),
            }
            np.savez(dump_path, meta=json.dumps(meta), **arrays)
        return out

    checkpoint.Checkpointer.restore_latest = recording_restore
    no_eval = os.environ.get("SCALE_WORKER_NO_EVAL") == "1"
    stop = os.environ.get("SCALE_WORKER_STOP_AFTER_TRAIN") == "1"

    def train(job, config, workdir):
        if no_eval:
            job = dataclasses.replace(job, eval_fn=None, sample_fn=None)
        state = loop.train(job, config, workdir)
        if stop:
            raise SystemExit(0)
        return state

    pretrain.train = train
    distill.train = train


def main() -> None:
    # config_flags reads the --config.* overrides from sys.argv itself: take the dump path out,
    # the rest is cdd_jax.main's command line.
    dump_path = sys.argv.pop(1)
    from absl import app

    from cdd_jax import main as cli

    _install_hooks(dump_path)
    app.run(cli.main)


if __name__ == "__main__":
    main()
