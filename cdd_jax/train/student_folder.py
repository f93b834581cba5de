"""The exported student: a self-contained folder that loads without the training config, the
workdir or the checkpoints.

    <folder>/params.safetensors   the evaluation-EMA parameters, keys "unet/down_0/..." (float32)
    <folder>/config.json          the FULL config of the run that trained it (rebuilds the network,
                                  the schedule and the sampler: `cdd_jax.config.saved`)
    <folder>/student.json         what it is for: scale, degradation preset, training crop size,
                                  sampler settings, the job's evaluation rows, provenance
    <folder>/manifest.json        sha256 and size of every other file, checked at load

A missing, extra-short or altered file is an error naming the file (`verify_manifest`). The folder
is written next to its destination and renamed into place, so a reader never sees half of one.
This module is file format only: rebuilding the network is `cdd_jax.inference.student`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cdd_jax.fileio import replaced_folder

FORMAT = "cdd_jax-student"
FORMAT_VERSION = 1
PARAMS, CONFIG, INFO = "params.safetensors", "config.json", "student.json"
MANIFEST = "manifest.json"
FILES = (PARAMS, CONFIG, INFO)


class StudentFolderError(ValueError):
    """A student folder that is missing, incomplete or corrupted (the message names the file)."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            array = np.asarray(value)
            if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
                array = array.astype(np.float32)  # safetensors.numpy knows only numpy's dtypes.
            flat[name] = np.ascontiguousarray(array)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(source_workdir: str | None = None) -> dict[str, Any]:
    """Who made it, when, from what: versions, commit, host."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("cdd_jax", "jax", "flax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": _git_commit(), "versions": versions, "python": platform.python_version(),
            "host": platform.node(),
            "source_workdir": os.path.abspath(source_workdir) if source_workdir else None}


def _dump(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_student_folder(path: str, params: Mapping, config: Mapping, info: Mapping) -> str:
    """Writes the folder (replacing one already at `path`); returns its absolute path.

    `params`: the conditional network's parameter tree (host arrays); `config`: the run config as
    a plain dict; `info`: the student.json content (`format` and `format_version` are added).
    """
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    with replaced_folder(path) as out:
        tmp = str(out)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 -> what makedirs would have given.
        save_file(_flatten(params), os.path.join(tmp, PARAMS), metadata={"format": FORMAT})
        _dump(os.path.join(tmp, CONFIG), dict(config))
        _dump(os.path.join(tmp, INFO), {**info, "format": FORMAT, "format_version": FORMAT_VERSION})
        files = {name: {"sha256": sha256(os.path.join(tmp, name)),
                        "bytes": os.path.getsize(os.path.join(tmp, name))} for name in FILES}
        _dump(os.path.join(tmp, MANIFEST), {"format": FORMAT, "format_version": FORMAT_VERSION,
                                            "files": files})
    return path


def verify_manifest(path: str) -> dict:
    """Checks every file the manifest lists against its size and sha256; returns the manifest.
    Raises StudentFolderError naming the first missing or altered file."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise StudentFolderError(f"student folder {path!r} does not exist")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudentFolderError(
            f"{manifest_path}: missing or unreadable manifest ({type(e).__name__}: {e}); this "
            "is not a complete student folder") from e
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise StudentFolderError(f"{path!r} is a student folder of format version "
                                 f"{manifest['format_version']}; this version reads up to "
                                 f"{FORMAT_VERSION}")
    for name in FILES:
        if name not in files:
            raise StudentFolderError(f"{manifest_path} does not list {name}")
    for name, entry in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise StudentFolderError(f"{file}: missing (listed in the manifest)")
        if os.path.getsize(file) != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise StudentFolderError(f"{file}: content does not match the manifest's sha256 "
                                     "(corrupted or edited copy)")
    return manifest


def read_student_folder(path: str) -> tuple[dict, dict, dict]:
    """(params as numpy arrays, config dict, student.json dict), after `verify_manifest`."""
    from safetensors.numpy import load_file

    path = os.path.abspath(os.path.expanduser(path))
    verify_manifest(path)
    params = _unflatten(load_file(os.path.join(path, PARAMS)))
    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    with open(os.path.join(path, INFO)) as f:
        info = json.load(f)
    return params, config, info


def student_info(config, metrics: Any = None, source_workdir: str | None = None,
                 note: str = "") -> dict:
    """student.json of a run config: what the student is for and how it is sampled."""
    ecfg = config.evaluate
    return {
        "task": "super-resolution",
        "scale": int(config.degradation.scale),
        "degradation_preset": str(config.degradation.preset),
        "crop_size": int(config.data.crop_size),
        "objective": str(config.distill.objective),
        "sampler": {"grid": str(ecfg.grid), "renoise": [str(r) for r in ecfg.renoise],
                    "steps": [int(k) for k in ecfg.student_steps],
                    "default_steps": int(max(ecfg.student_steps)),
                    "default_renoise": str(ecfg.get("default_renoise") or ecfg.renoise[0])},
        "train_steps": int(config.train.num_steps),
        "seed": int(config.seed),
        "metrics": metrics,
        "provenance": provenance(source_workdir),
        "note": note,
    }


def save_student(path: str, params: Mapping, config, *, metrics: Any = None,
                 source_workdir: str | None = None, note: str = "") -> str:
    """Exports a distilled student (`params`: the conditional network's host parameters, `config`:
    its run's ConfigDict, `metrics`: e.g. the job's evaluation rows) as a student folder."""
    return write_student_folder(path, params, config.to_dict(),
                                student_info(config, metrics, source_workdir, note))
