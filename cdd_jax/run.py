"""`train_and_evaluate(config, workdir)`: the job entry point, dispatching on `config.stage`.

    "pretrain"  stage 1: the unconditional teacher -> <workdir>/export     (stages/pretrain.py)
    "sr"        teacher -> CoDi distillation -> evaluation                  (stages/sr.py)
    "table1"    the paper's Table 1 at small scale                          (stages/table1.py)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import jax
import ml_collections

from cdd_jax.config.validate import validate_config
from cdd_jax.parallel.distributed import assert_same_config_across_processes, is_main_process
from cdd_jax.parallel.mesh import configure_cpu_devices
from cdd_jax.stages.pretrain import pretrain
from cdd_jax.stages.sr import run_sr
from cdd_jax.stages.table1 import run_table1
from cdd_jax.stages.teacher import resolve_teacher

STAGE_RUNNERS = {"pretrain": pretrain, "sr": run_sr, "table1": run_table1}


def check_workdir(workdir: str, probe_bytes: int = 1 << 20) -> None:
    """The workdir must be creatable and writable (checked at start, not at the first save).

    Writes and syncs `probe_bytes` (1 MiB) so that a full disk or quota fails here, and warns
    when less than 1 GiB is free (checkpoints of large models need far more).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(workdir).free
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e
    if free < 1 << 30:
        logging.warning("workdir %r has only %.1f MiB free", workdir, free / 2**20)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Runs `config.stage` in `workdir`; safe to call again to resume."""
    # First: JAX's backends must not have started (validation's mesh check starts them).
    configure_cpu_devices(config.mesh.get("num_cpu_devices", 0), config.data.batch_size)
    validate_config(config)
    if "teacher" in config:
        resolve_teacher(config)  # a diffusers teacher's architecture and units into config.model
    check_workdir(workdir)
    assert_same_config_across_processes(config)
    jax.config.update("jax_threefry_partitionable", True)
    if is_main_process():
        with open(os.path.join(workdir, f"config_{config.stage}.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    return STAGE_RUNNERS[config.stage](config, workdir)
