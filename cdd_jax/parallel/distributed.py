"""Multi-process (multi-host) start-up and cross-process consistency checks.

`maybe_initialize` must run before anything touches a JAX backend (device lists, arrays, jit).

Auto-detection (`mode="auto"`) initialises `jax.distributed` only when the job clearly spans
several processes:
  * SLURM: inside an `srun` step with more than one task, i.e. `SLURM_NTASKS` > 1 and
    `SLURM_STEP_NODELIST`, `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_JOB_ID` set (what JAX's own
    SLURM cluster detection reads; it then picks the coordinator, process count and id, and
    binds one GPU per task via `SLURM_LOCALID`; export `JAX_LOCAL_DEVICE_IDS` to override).
  * Cloud TPU pod slices / multislice: `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` listing
    more than one worker, or `MEGASCALE_COORDINATOR_ADDRESS` set (GKE and multislice set these
    as environment variables; on plain TPU VMs the worker list lives in the metadata server, so
    `launch/tpu_pod.sh` passes `--distributed=yes` and JAX queries it).
  * Explicit arguments: `coordinator_address`, `num_processes` and `process_id` all given.
A single plain process (a laptop, one GPU box, a single-host TPU VM) is never initialised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_MODES = ("auto", "yes", "no")


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _env_list_len(name: str) -> int:
    value = os.environ.get(name, "")
    return len([v for v in value.split(",") if v.strip()])


def detect_cluster() -> str | None:
    """Names the multi-process environment this process runs in ('slurm', 'tpu') or None."""
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if (_int_env("SLURM_NTASKS") or 1) > 1 and all(v in os.environ for v in slurm_vars):
        return "slurm"
    if (
        _env_list_len("TPU_WORKER_HOSTNAMES") > 1
        or _env_list_len("TPU_PROCESS_ADDRESSES") > 1
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    ):
        return "tpu"
    return None


def maybe_initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when asked or detected; returns whether it is running.

    mode: "yes" always initialises (explicit arguments, else JAX's cluster auto-detection), "no"
    never does, "auto" does so for a detected cluster or complete explicit arguments. Calling it
    again after a successful initialisation is a no-op.
    """
    if mode not in _MODES:
        raise ValueError(f"distributed mode must be one of {_MODES}, got {mode!r}.")
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [k for k, v in explicit.items() if v is not None]
    if mode == "no":
        if given:
            raise ValueError(f"--distributed=no contradicts the explicit arguments {given}.")
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, num_processes={num_processes}).")
    cluster = detect_cluster()
    if mode == "auto":
        if 0 < len(given) < 3 and cluster is None:
            missing = [k for k in explicit if k not in given]
            raise ValueError(
                f"Explicit multi-process setup needs all of {list(explicit)}; missing {missing}."
            )
        if not given and cluster is None:
            return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, summaries and sample images."""
    return jax.process_index() == 0


def _to_plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def config_fingerprint(config: Any) -> str:
    """sha256 (hex) of the config's canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(_to_plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def assert_same_config_across_processes(config: Any) -> None:
    """Raises ValueError on every process if any process holds a different config than process 0.

    All processes must call it (it is a collective). Catches hosts launched with different flags
    or code versions before they train silently divergent replicas.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(config_fingerprint(config)), dtype=np.uint8)
    all_digests = np.asarray(multihost_utils.process_allgather(digest))
    all_digests = all_digests.reshape(jax.process_count(), digest.size)
    differ = [
        i for i in range(all_digests.shape[0]) if not np.array_equal(all_digests[i], all_digests[0])
    ]
    if differ:
        raise ValueError(
            f"Config differs from process 0's on process(es) {differ} "
            f"(fingerprint prefixes: {[d.tobytes().hex()[:12] for d in all_digests]})."
        )


def to_host(tree: Any) -> Any:
    """numpy copies of a tree's arrays on every process, fetching the shards that live on other
    processes' devices (`process_allgather`) where an array is not fully addressable.

    A collective when any array spans several processes: every process must call it, with the
    same tree, in the same order. `jax.device_get` alone fails on such arrays (FSDP over hosts).
    """
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def barrier(name: str) -> None:
    """All processes wait here until every process has arrived (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
