"""Orbax checkpoints: one composite per step holding the train state, the data-iterator state
and the config.

Orbax writes each step into a temporary directory and renames it only once complete, so a step
directory that exists is complete; `restore_latest` still verifies and, if the newest checkpoint
cannot be read (truncated or missing files), warns, moves it aside and falls back to the newest
readable one. Older checkpoints are deleted by keep-N only after a newer save has finished.
Not detected: flipped bits inside an array's data file (OCDBT stores no checksums of the values).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cdd_jax.parallel.distributed import barrier, to_host

PyTree = Any
ITEMS = ("state", "data", "config")


class Checkpointer:
    """Async, keep-N checkpoint manager for the train state, iterator state and config."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, step: int, state: PyTree, data_state: dict | None, config: dict,
             *, force: bool = False) -> bool:
        """Saves `step` (async if configured); False if not saved.

        A step already saved (or being saved) is not written again: a preemption right after a
        periodic save at the same step, or the final save of a run that ends on a checkpoint step,
        would otherwise fail with orbax's StepAlreadyExistsError.
        """
        if int(step) in self.manager.all_steps():
            logging.info("checkpoint for step %d already in %s; not saving it again", step,
                         self.directory)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(int(step), args=args, force=force)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, dict] | None:
        """(step, state, data_state) of the newest complete checkpoint, or None if there is none.

        `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings (the restore target),
        so a checkpoint written on one mesh restores onto another. Checkpoints newer than the
        restored one that cannot be read are moved to `<directory>.unreadable/` (kept, not
        deleted): left in place, keep-N would count them and the run could never save their step
        again. If checkpoints exist but none can be read (e.g. the config no longer matches
        them), raises ValueError rather than silently starting over next to them.
        """
        steps = self.all_steps()
        unreadable: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                logging.warning("checkpoint at step %d in %s is unreadable (%s); trying an older "
                                "one", step, self.directory, reason)
                unreadable.append((step, reason))
                continue
            if unreadable:
                self._quarantine([s for s, _ in unreadable])
            return step, restored["state"], dict(restored["data"] or {})
        if unreadable:
            step, reason = unreadable[0]
            raise ValueError(
                f"none of the checkpoints in {self.directory} (steps {steps}) can be restored "
                f"into this run's train state (step {step}: {reason}). They are left untouched: "
                "restore the config they were written with, or use another workdir."
            )
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step directories to `<directory>.unreadable/<step>-<n>`."""
        target_root = self.directory + ".unreadable"
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if not os.path.isdir(src):
                    continue
                n = 0
                while os.path.exists(dst := os.path.join(target_root, f"{step}-{n}")):
                    n += 1
                os.rename(src, dst)
                logging.warning("moved unreadable checkpoint %s to %s", src, dst)
        barrier("cdd_jax_checkpoint_quarantine")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(int(step))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(path: str, params: PyTree, metadata: dict) -> None:
    """Writes a standalone parameter checkpoint (e.g. a teacher's EMA params) plus metadata JSON."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    # Every process calls this (Orbax saves collectively); arrays sharded over several processes
    # are gathered first (`to_host`), and the metadata is complete before any process returns.
    ckptr.save(os.path.join(path, "params"), to_host(params), force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
    barrier("cdd_jax:export_params")


def replicated_target(item_dir: str) -> PyTree:
    """Restore target for the arrays saved in an Orbax item directory: their shapes and dtypes,
    replicated over this job's devices. Without a target Orbax restores onto the topology that
    wrote the checkpoint and refuses another one (a checkpoint from a 2-device run loaded on one
    device, a pod checkpoint loaded on a laptop)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    meta = ocp.StandardCheckpointer().metadata(item_dir)
    tree = getattr(meta, "item_metadata", meta)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def load_params(path: str, *, which: str = "ema_params") -> tuple[PyTree, dict]:
    """Loads parameters from an exported params checkpoint or a training run's checkpoint dir.

    Accepts: a directory written by `export_params` (params/ + metadata.json); a training workdir
    or its `checkpoints/` directory (the newest complete step's `which` parameters are used).
    Whatever topology wrote it, the arrays come back replicated over this job's devices.
    Raises FileNotFoundError / ValueError with the path when nothing loadable is there.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist")
    if os.path.isdir(os.path.join(path, "params")):
        meta_path = os.path.join(path, "metadata.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        params_dir = os.path.join(path, "params")
        return ocp.StandardCheckpointer().restore(params_dir, replicated_target(params_dir)), meta
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    mngr = ocp.CheckpointManager(path, item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    for step in reversed(sorted(mngr.all_steps())):
        try:
            target = replicated_target(os.path.join(path, str(step), "state"))
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            logging.warning("teacher checkpoint step %d in %s unreadable: %s", step, path, e)
            continue
        state = restored["state"]
        if which not in state:
            raise ValueError(f"checkpoint {path!r} step {step} has no {which!r}")
        return state[which], {"config": restored["config"], "step": int(step)}
    raise ValueError(
        f"no loadable checkpoint in {path!r}: expected an exported params directory "
        "(params/ + metadata.json) or an Orbax CheckpointManager directory"
    )
