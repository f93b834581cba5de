"""Stable-Diffusion-style pipeline folders: what a latent, text-conditioned teacher brings.

    model_index.json                      {"_class_name": "StableDiffusionPipeline", ...}
    unet/                                 UNet2DConditionModel (config.json + safetensors)
    vae/                                  AutoencoderKL
    scheduler/scheduler_config.json       schedule, prediction type (epsilon or v_prediction)
    text_encoder/, tokenizer/             (a real SD folder; read only by `compute_prompt_embeds`)
    cdd_jax_prompt_embeds/prompt_embeds.safetensors   the fixed prompt embedding [1, T, D]
    cdd_jax_prompt_embeds/prompt.json     {"prompt": ""}  (the prompt it encodes)

The U-Net cross-attends to a prompt embedding. For super-resolution the paper's prompt is fixed
(the empty prompt), so it is computed ONCE, at conversion time, with the pipeline's own text
encoder (`compute_prompt_embeds`, which needs torch + transformers: the `peers` extra) and
stored in the folder; training and inference then need neither. diffusers ignores the extra
folder (it is not listed in model_index.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn
import numpy as np

from cdd_jax.convert.diffusers import DIFFUSERS_VERSION, load_diffusers, resolve, save_diffusers
from cdd_jax.fileio import replaced_folder

PROMPT_DIR = "cdd_jax_prompt_embeds"
PROMPT_FILE = "prompt_embeds.safetensors"
_PATTERNS = ["model_index.json", "unet/*", "vae/*", "scheduler/*", f"{PROMPT_DIR}/*"]


def is_sd_folder(path: str) -> bool:
    """True for a local pipeline folder whose U-Net is a UNet2DConditionModel."""
    p = Path(os.path.expanduser(path)) / "unet" / "config.json"
    try:
        return json.loads(p.read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, json.JSONDecodeError):
        return False


def save_prompt_embeds(folder: str | os.PathLike, embeds: np.ndarray, prompt: str = "") -> None:
    """Stores the fixed prompt embedding [1, T, D] (float32) in a pipeline folder."""
    from safetensors.numpy import save_file

    embeds = np.asarray(embeds, np.float32)
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"a prompt embedding is [1, T, D], got shape {embeds.shape}")
    with replaced_folder(Path(folder) / PROMPT_DIR) as tmp:
        save_file({"prompt_embeds": embeds}, tmp / PROMPT_FILE)
        (tmp / "prompt.json").write_text(json.dumps({"prompt": prompt}) + "\n")


def load_prompt_embeds(path: str | os.PathLike) -> np.ndarray:
    """The stored prompt embedding [1, T, D] of a pipeline folder (or hub id)."""
    from safetensors.numpy import load_file

    f = resolve(path, _PATTERNS) / PROMPT_DIR / PROMPT_FILE
    if not f.is_file():
        raise ValueError(f"{path!r} has no stored prompt embedding ({PROMPT_DIR}/{PROMPT_FILE}); "
                         "write it once with cdd_jax.convert.sd.compute_prompt_embeds (needs "
                         "torch + transformers) or save_prompt_embeds")
    return load_file(str(f))["prompt_embeds"]


def read_subfolder_config(path: str | os.PathLike, subfolder: str) -> dict:
    """`<subfolder>/config.json` of a pipeline folder (or hub id)."""
    f = resolve(path, _PATTERNS) / subfolder / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"teacher {str(path)!r}: cannot read {f}: {e}") from e


def load_vae(path: str | os.PathLike, **kw) -> tuple[nn.Module, dict]:
    """(AutoencoderKL port, params) from the `vae/` of a pipeline folder (or hub id)."""
    return load_diffusers(resolve(path, _PATTERNS), subfolder="vae", **kw)


def encode_prompts(folder: str | os.PathLike, prompts: list[str], *, batch_size: int = 32,
                   progress=None) -> np.ndarray:
    """[N, T, D] float32: each prompt encoded with the pipeline's own CLIP tokenizer + text
    encoder (torch and transformers, imported here only) as the SD pipelines do (padded to the
    tokenizer's maximum length, truncated there, the text encoder's last hidden state).
    `progress`: optional callable(number done) after each batch."""
    try:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError("encoding prompts needs torch and transformers (pip install "
                          "'cdd_jax[peers]'); or write the embeddings with another encoder "
                          "(cdd_jax.convert.sd.save_prompt_embeds, "
                          "cdd_jax.data.captions.write_prompt_embeds)") from e

    root = Path(folder)
    for sub in ("tokenizer", "text_encoder"):
        if not (root / sub).is_dir():
            raise ValueError(f"{str(folder)!r} has no {sub}/: encoding prompts needs the "
                             "pipeline's own tokenizer and text encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(encoder(ids)[0].float().numpy())
        if progress is not None:
            progress(min(start + batch_size, len(prompts)))
    return np.concatenate(out).astype(np.float32)


def compute_prompt_embeds(folder: str | os.PathLike, prompt: str = "") -> np.ndarray:
    """Encodes `prompt` with the pipeline's own text encoder (`encode_prompts`: needs torch and
    transformers), stores it in the folder as its fixed prompt embedding and returns it."""
    embeds = encode_prompts(folder, [prompt])
    save_prompt_embeds(folder, embeds, prompt)
    return embeds


def save_sd_pipeline(out_dir: str | os.PathLike, unet: nn.Module, unet_params: dict,
                     vae: nn.Module, vae_params: dict, *, scheduler: dict,
                     prompt_embeds: np.ndarray, prompt: str = "") -> Path:
    """Writes an SD-style teacher folder (layout above, without text encoder and tokenizer)."""
    out = Path(out_dir)
    with replaced_folder(out) as tmp:
        save_diffusers(unet, unet_params, tmp / "unet")
        save_diffusers(vae, vae_params, tmp / "vae")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2, sort_keys=True) + "\n")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
                 "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        save_prompt_embeds(tmp, prompt_embeds, prompt)
    return out
