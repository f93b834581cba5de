"""Orbax checkpoints: one composite per step holding the train state, data-iterator state and config.

Orbax writes each step into a temporary directory and renames it only once complete, so a step
directory that exists is complete; `restore_latest` still verifies and, if the newest checkpoint
cannot be read (truncated or missing files), warns and falls back to the newest readable one.
Older checkpoints are deleted by keep-N only after a newer save has finished.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        so a checkpoint written on one mesh restores onto another.
        """
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                logging.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                    step, self.directory, type(e).__name__, str(e).splitlines()[0][:300],
                )
                continue
            return step, restored["state"], dict(restored["data"] or {})
        return None

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
    ckptr.save(os.path.join(path, "params"), jax.device_get(params), force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)


def load_params(path: str, *, which: str = "ema_params") -> tuple[PyTree, dict]:
    """Loads parameters from an exported params checkpoint or a training run's checkpoint dir.

    Accepts: a directory written by `export_params` (params/ + metadata.json); a training workdir
    or its `checkpoints/` directory (the newest complete step's `which` parameters are used).
    Raises FileNotFoundError / ValueError with the path when nothing loadable is there.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist")
    if os.path.isdir(os.path.join(path, "params")):
        meta_path = os.path.join(path, "metadata.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        return ocp.StandardCheckpointer().restore(os.path.join(path, "params")), meta
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    mngr = ocp.CheckpointManager(path, item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    for step in reversed(sorted(mngr.all_steps())):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
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
