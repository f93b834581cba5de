"""Reading a saved run config (`<workdir>/config_<stage>.json`, an exported student's
`config.json`) back onto the current defaults.

A config saved by an older version of the code lacks the keys added since; a reader that rebuilt
the network from the saved keys alone would fail, or silently take whatever a constructor's
default is today. `saved_config` starts from the current preset of the saved stage (every key
present, at its default), overlays every saved value, and renames sections that were renamed, so
the result holds exactly what was saved plus today's defaults for what was not. Keys the current
code does not know are kept (a newer run read by older code): the readers ignore them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from cdd_jax.config.presets import STAGES, preset
from cdd_jax.data.degradations import degradation_config

# Sections renamed since configs were first saved: old name -> current name.
RENAMED_SECTIONS = {"adapter": "control"}
# Keys whose default has changed and whose absence from a saved config therefore means the OLD
# value, as {"section.key": old_value}. A new option whose default is not the behaviour older
# runs had (e.g. a model family key whose default is a new family) belongs here.
LEGACY_VALUES: dict[str, Any] = {
    # Runs from before the model families used the original U-Net.
    "model.family": "cdd",
    "teacher.pretrain.model.family": "cdd",
}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _overlay(base: dict, saved: Mapping, prefix: str = "") -> dict:
    """`base` with every value of `saved` put in, recursively; lists (and lists in them) become
    tuples where the default is a tuple (JSON has no tuples)."""
    out = dict(base)
    for key, value in saved.items():
        default = out.get(key)
        if isinstance(value, Mapping) and isinstance(default, Mapping):
            out[key] = _overlay(default, value, f"{prefix}{key}.")
        elif isinstance(value, list) and isinstance(default, tuple):
            out[key] = _tuples(value)
        else:
            out[key] = value
    return out


def _legacy(saved: dict) -> dict:
    """Puts the old value of every LEGACY_VALUES key the saved config does not hold."""
    for dotted, old in LEGACY_VALUES.items():
        section, _, key = dotted.rpartition(".")
        node = saved
        for part in filter(None, section.split(".")):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key not in node:
            node[key] = old
    return saved


def saved_config(saved: str | os.PathLike | Mapping) -> ml_collections.ConfigDict:
    """A saved job config (a JSON file's path, or its parsed dict) on today's defaults.

    The defaults are the saved stage's "default" preset, with the degradation section of the
    saved degradation preset (so a "bicubic" run is not filled in with Real-ESRGAN values).
    """
    if not isinstance(saved, Mapping):
        with open(saved) as f:
            saved = json.load(f)
    saved = json.loads(json.dumps(saved))  # A private deep copy.
    for old, new in RENAMED_SECTIONS.items():
        if old in saved and new not in saved:
            saved[new] = saved.pop(old)
    saved = _legacy(saved)
    stage = saved.get("stage", "sr")
    if stage not in STAGES:
        raise ValueError(f"saved config has stage {stage!r}; this version knows {STAGES}")
    base = preset(stage).to_dict()
    if isinstance(saved.get("degradation"), Mapping):
        base["degradation"] = degradation_config(
            saved["degradation"].get("preset", "realesrgan")).to_dict()
    return ml_collections.ConfigDict(_overlay(base, saved))
