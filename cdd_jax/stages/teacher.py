"""The unconditional teacher of a distillation job: the `teacher` config section and its loading.

The teacher is the pretrained *unconditional* U-Net that CoDi starts from (the fine-tuned
conditional model that CM / GD distil is called `finetuned` everywhere). It comes from
`teacher.checkpoint`: a diffusers model or pipeline folder (or hub id) holding a `UNet2DModel`,
read by `cdd_jax.convert` (the shipped teacher is one), or an Orbax params folder / pretraining
workdir written by cdd_jax; or it is pretrained in the job's workdir.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.console import note
from cdd_jax.convert import pipeline, sd
from cdd_jax.convert.diffusers import canonical_json, load_diffusers
from cdd_jax.diffusion import PREDICTION_TYPES
from cdd_jax.models.backbone import unet2d_config
from cdd_jax.stages.pretrain import pretrain
from cdd_jax.train.checkpoint import load_params

PyTree = Any
SHIPPED_TEACHER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "teacher")
# Model settings that do not change the parameters a checkpoint holds.
_RUNTIME_MODEL_KEYS = ("dropout", "remat", "dtype")


def teacher_config(pretrain: ml_collections.ConfigDict, *,
                   shipped: bool) -> ml_collections.ConfigDict:
    """The `teacher` section; `pretrain`: the pretraining job used when no checkpoint is given."""
    c = ml_collections.ConfigDict()
    # Teacher checkpoint: a diffusers UNet2DModel model/pipeline folder or hub id, a cdd_jax
    # exported params dir, a pretraining workdir or its checkpoints/ dir.
    # Empty: pretrain one with `teacher.pretrain` in <workdir>/teacher (reused if already there).
    c.checkpoint = SHIPPED_TEACHER if shipped else ""
    c.pretrain = pretrain
    return c


def validate_teacher_config(cfg: ml_collections.ConfigDict) -> None:
    if not isinstance(cfg.checkpoint, str):
        raise TypeError(f"teacher.checkpoint must be a path (str), got {cfg.checkpoint!r}")
    if (cfg.checkpoint and not os.path.exists(os.path.expanduser(cfg.checkpoint))
            and not pipeline.is_diffusers_folder(cfg.checkpoint)):
        raise FileNotFoundError(f"teacher.checkpoint {cfg.checkpoint!r} does not exist (and is "
                                "not a Hugging Face hub id)")
    checks.choice(cfg.pretrain, "stage", ("pretrain",), prefix="teacher.pretrain.")


def check_teacher_matches(path: str, meta: dict, model_cfg: ml_collections.ConfigDict) -> None:
    """ValueError listing every model setting where a checkpoint's metadata and the config
    differ (settings that do not change the parameters are ignored)."""
    if "model" not in meta:
        return

    def plain(d):
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}

    saved = {"family": "cdd", "diffusers_config": "", "num_train_timesteps": 1000,
             "latent_factor": 1, "latent_channels": 0, "prompt_tokens": 0,
             "prompt_embed_dim": 0, **plain(meta["model"])}  # checkpoints from before these
    wanted = plain(model_cfg.to_dict())
    diff = {k: (saved.get(k), wanted.get(k)) for k in set(saved) | set(wanted)
            if k not in _RUNTIME_MODEL_KEYS and saved.get(k) != wanted.get(k)}
    if diff:
        raise ValueError(
            f"teacher checkpoint {path!r} does not match config.model: "
            + ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}"
                        for k, (a, b) in sorted(diff.items())))


def resolve_teacher(config: ml_collections.ConfigDict) -> None:
    """Fills `config.model` from a diffusers teacher checkpoint (its UNet2DModel config and time
    units) and checks its scheduler against `config.diffusion`; nothing for other teachers.

    Raises ValueError naming the mismatch (family, architecture, schedule, prediction type)
    before anything is built or compiled.
    """
    path = config.teacher.checkpoint
    if not path or not pipeline.is_diffusers_folder(path):
        if config.model.family == "unet2d_condition":
            raise ValueError("model.family='unet2d_condition' needs teacher.checkpoint: a "
                             "Stable-Diffusion-style pipeline folder (unet/, vae/, scheduler/, "
                             "a stored prompt embedding)")
        return
    found = pipeline.read_config(path)
    if found.get("_class_name") == "UNet2DConditionModel":
        _resolve_latent_teacher(config, path, found)
        return
    if found.get("_class_name") != "UNet2DModel":
        raise ValueError(f"teacher.checkpoint {path!r} holds a {found.get('_class_name')!r}; "
                         "a pixel-space teacher must be a UNet2DModel")
    if config.model.family != "unet2d":
        raise ValueError(f"teacher.checkpoint {path!r} is a diffusers UNet2DModel but "
                         f"model.family={config.model.family!r}; set model.family=unet2d")
    text = canonical_json(found)
    if config.model.diffusers_config and (canonical_json(json.loads(
            config.model.diffusers_config)) != text):
        raise ValueError(f"model.diffusers_config differs from the config.json of "
                         f"teacher.checkpoint {path!r}; leave model.diffusers_config empty to "
                         "take the checkpoint's")
    config.model.diffusers_config = text
    facts = pipeline.read_schedule(path)
    if facts is None:
        logging.warning("teacher %s has no scheduler config: assuming config.diffusion "
                        "(schedule %r, %s)", path, config.diffusion.schedule,
                        config.diffusion.prediction_type)
        return
    check_schedule(path, facts, config)
    config.model.num_train_timesteps = int(facts["num_train_timesteps"])


def _resolve_latent_teacher(config: ml_collections.ConfigDict, path: str, found: dict) -> None:
    """The SD-style branch of `resolve_teacher`: U-Net config, the VAE's latent space and the
    stored prompt embedding into `config.model`, each checked against what the config asks."""
    m = config.model
    if m.family != "unet2d_condition":
        raise ValueError(f"teacher.checkpoint {path!r} is a latent text-conditioned "
                         f"UNet2DConditionModel but model.family={m.family!r}; set "
                         "model.family=unet2d_condition")
    text = canonical_json(found)
    if m.diffusers_config and (canonical_json(json.loads(m.diffusers_config)) != text):
        raise ValueError(f"model.diffusers_config differs from the U-Net config.json of "
                         f"teacher.checkpoint {path!r}; leave it empty to take the checkpoint's")
    vae_cfg = sd.read_subfolder_config(path, "vae")
    latent = int(vae_cfg.get("latent_channels", 4))
    width = int(found["cross_attention_dim"])
    embeds_shape = sd.load_prompt_embeds(path).shape
    for name, want, got in (("model.latent_channels", m.latent_channels, latent),
                            ("model.prompt_embed_dim", m.prompt_embed_dim, width)):
        if want and want != got:
            raise ValueError(f"teacher {path!r} has {got} for {name} but the config asks for "
                             f"{want}")
    if found["in_channels"] != latent or found["out_channels"] != latent:
        raise ValueError(f"teacher {path!r}: its U-Net reads {found['in_channels']} and writes "
                         f"{found['out_channels']} channels but its VAE has {latent} latent "
                         "channels")
    if embeds_shape[-1] != width:
        raise ValueError(f"teacher {path!r}: the stored prompt embedding is {embeds_shape[-1]} "
                         f"wide but the U-Net's cross_attention_dim is {width}")
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if config.data.crop_size % (factor * 2 ** (len(found["block_out_channels"]) - 1)):
        raise ValueError(f"data.crop_size {config.data.crop_size} is not divisible by the VAE's "
                         f"factor {factor} times the U-Net's depth")
    if config.control.anchor_precision > 0:
        raise ValueError("the low-frequency anchor (control.anchor_precision) works in pixel "
                         "space only; set control.anchor_precision=0 for a latent teacher")
    m.diffusers_config = text
    m.update(latent_factor=factor, latent_channels=latent, prompt_tokens=int(embeds_shape[1]),
             prompt_embed_dim=width)
    facts = pipeline.read_schedule(path)
    if facts is None:
        raise ValueError(f"teacher {path!r} has no scheduler/scheduler_config.json")
    check_schedule(path, facts, config)
    m.num_train_timesteps = int(facts["num_train_timesteps"])


def check_schedule(path: str, facts: dict, config: ml_collections.ConfigDict) -> None:
    """ValueError when a teacher's scheduler is not the one the job's diffusion core uses: its
    prediction type must be `diffusion.prediction_type` (the student keeps the teacher's)."""
    kind = facts["prediction_type"]
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"teacher {path!r} predicts {kind!r}, which cdd_jax cannot read; "
                         f"supported prediction types: {PREDICTION_TYPES}")
    if kind != config.diffusion.prediction_type:
        raise ValueError(f"teacher {path!r} predicts {kind!r} (its scheduler config) but "
                         f"diffusion.prediction_type={config.diffusion.prediction_type!r}; set "
                         f"--config.diffusion.prediction_type={kind}")
    own = facts.get("cdd_jax_schedule") or {}
    name = own.get("name") or {"scaled_linear": "scaled_linear"}.get(facts["beta_schedule"])
    if name != config.diffusion.schedule:
        raise ValueError(f"teacher {path!r} was trained with the {facts['beta_schedule']!r} "
                         f"schedule ({name or 'no continuous equivalent'} in cdd_jax) but "
                         f"diffusion.schedule={config.diffusion.schedule!r}")
    betas = (float(facts["beta_start"]), float(facts["beta_end"]))
    if name == "scaled_linear" and not own and betas != (0.00085, 0.012):
        raise ValueError(f"teacher {path!r}: scaled_linear betas {betas}; cdd_jax's "
                         "scaled_linear schedule is Stable Diffusion's (0.00085, 0.012)")


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
    """The teacher's params: from `teacher.checkpoint`, or pretrained (or reused) in
    <workdir>/teacher. Call `resolve_teacher(config)` first (the job does)."""
    path = config.teacher.checkpoint
    if not path:
        tdir = os.path.join(workdir, "teacher")
        export = os.path.join(tdir, "export")
        if os.path.isdir(os.path.join(export, "params")) or pipeline.is_diffusers_folder(export):
            note("reusing the teacher pretrained in %s", tdir)
            path = export
        else:
            note("no teacher checkpoint given: pretraining one in %s", tdir)
            return pretrain(config.teacher.pretrain, tdir)[0]
    if pipeline.is_diffusers_folder(path):
        folder, sub = pipeline.unet_location(path)
        module, params = load_diffusers(folder, subfolder=sub)
        wanted = canonical_json(unet2d_config(config.model, config.data.crop_size))
        if canonical_json(module.config) != wanted:
            raise ValueError(f"teacher {path!r}: its config.json does not match config.model "
                             f"(checkpoint {canonical_json(module.config)} vs config {wanted})")
        return params
    params, meta = load_params(path)
    check_teacher_matches(path, meta, config.model)
    saved_kind = meta.get("diffusion", {}).get("prediction_type", "v_prediction")
    if saved_kind != config.diffusion.prediction_type:
        raise ValueError(f"teacher checkpoint {path!r} predicts {saved_kind!r} but "
                         f"diffusion.prediction_type={config.diffusion.prediction_type!r}")
    return params

