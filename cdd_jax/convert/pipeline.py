"""Teacher folders in the diffusers pipeline layout (what `diffusers.DDPMPipeline` loads):

    model_index.json                      {"_class_name": "DDPMPipeline", "unet": ..., ...}
    unet/config.json                      the UNet2DModel config
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json       DDPMScheduler: schedule, prediction type, units
    cdd_jax.json                          provenance (how it was trained, held-out loss, ...)

cdd_jax's schedules are continuous in t; the nearest discrete diffusers schedule is written for
diffusers, and the exact continuous one under the extra key `cdd_jax_schedule` (diffusers
ignores keys it does not know), which is what cdd_jax reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn

from cdd_jax.convert.diffusers import (
    CONFIG_NAME,
    DIFFUSERS_VERSION,
    looks_like_hub_id,
    read_scheduler_config,
    resolve,
    save_diffusers,
)
from cdd_jax.diffusion import check_prediction_type
from cdd_jax.fileio import replaced_folder

METADATA_NAME = "cdd_jax.json"
# cdd_jax schedule -> the diffusers `beta_schedule` closest to it.
_DIFFUSERS_BETA_SCHEDULE = {"cosine": "squaredcos_cap_v2", "linear": "linear",
                            "scaled_linear": "scaled_linear"}


def scheduler_config(schedule: str, num_train_timesteps: int,
                     prediction_type: str = "v_prediction") -> dict:
    """A DDPMScheduler config for a cdd_jax teacher (see the module doc); `prediction_type` in
    diffusers' names ("v_prediction", "epsilon", "sample")."""
    if schedule not in _DIFFUSERS_BETA_SCHEDULE:
        raise ValueError(f"no diffusers schedule for {schedule!r}")
    check_prediction_type(prediction_type)
    cfg = dict(_class_name="DDPMScheduler", _diffusers_version=DIFFUSERS_VERSION,
               num_train_timesteps=int(num_train_timesteps),
               beta_schedule=_DIFFUSERS_BETA_SCHEDULE[schedule],
               prediction_type=prediction_type, clip_sample=True,
               clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
               cdd_jax_schedule=dict(name=schedule, continuous=True))
    if schedule == "scaled_linear":
        cfg.update(beta_start=0.00085, beta_end=0.012)
    return cfg


def save_pipeline(out_dir: str | os.PathLike, module: nn.Module, params: dict, *,
                  scheduler: dict, metadata: dict) -> Path:
    """Writes a teacher pipeline folder (layout above); never leaves `out_dir` half-written."""
    out = Path(out_dir)
    with replaced_folder(out) as tmp:
        save_diffusers(module, params, tmp / "unet")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2, sort_keys=True) + "\n")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", "DDPMScheduler"],
                 "unet": ["diffusers", module.config["_class_name"]]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return out


def is_diffusers_folder(path: str) -> bool:
    """True for a diffusers model folder (config.json), a pipeline folder (model_index.json) or,
    when `path` does not exist locally, a Hugging Face hub id."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        return (p / CONFIG_NAME).is_file() or (p / "model_index.json").is_file()
    return not p.exists() and looks_like_hub_id(path)


def unet_location(path: str) -> tuple[str, str | None]:
    """(folder, subfolder) of the U-Net in a model or pipeline folder (or hub id)."""
    root = resolve(path, ["model_index.json", "*.json", "unet/*.json", "scheduler/*.json",
                          "unet/diffusion_pytorch_model*.safetensors",
                          "diffusion_pytorch_model*.safetensors", METADATA_NAME])
    if (root / "model_index.json").is_file() and (root / "unet" / CONFIG_NAME).is_file():
        return str(root), "unet"
    return str(root), None


def read_config(path: str) -> dict:
    """The U-Net's config.json of a model or pipeline folder."""
    folder, sub = unet_location(path)
    model_dir = Path(folder) / sub if sub else Path(folder)
    try:
        return json.loads((model_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {model_dir / CONFIG_NAME}: {e}") from e


def read_schedule(path: str) -> dict | None:
    """The pipeline's scheduler facts (`read_scheduler_config`, plus `cdd_jax_schedule` when
    the folder was written by cdd_jax), or None for a bare model folder."""
    folder, sub = unet_location(path)
    if sub is None and not (Path(folder) / "scheduler_config.json").is_file():
        return None
    facts = read_scheduler_config(folder)
    for candidate in (Path(folder) / "scheduler" / "scheduler_config.json",
                      Path(folder) / "scheduler_config.json"):
        if candidate.is_file():
            facts["cdd_jax_schedule"] = json.loads(candidate.read_text()).get("cdd_jax_schedule")
            break
    return facts


def read_metadata(path: str) -> dict:
    """cdd_jax.json of a teacher folder written by `save_pipeline` ({} if absent)."""
    folder, _ = unet_location(path)
    meta = Path(folder) / METADATA_NAME
    return json.loads(meta.read_text()) if meta.is_file() else {}
