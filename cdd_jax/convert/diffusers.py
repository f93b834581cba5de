"""Import and export of diffusers model folders (config.json + safetensors), no torch needed.

    module, params = load_diffusers("path/to/pipeline", subfolder="unet")
    out = module.apply({"params": params}, sample_nhwc, timesteps, encoder_hidden_states)
    save_diffusers(module, params, "path/to/export")   # diffusers' from_pretrained loads it

The name mapping is mechanical: the linen module `down_blocks_0` is diffusers' `down_blocks.0`;
a conv `kernel` (HWIO) is a `weight` (OIHW), a dense `kernel` (in, out) a `weight` (out, in), a
norm `scale` a `weight`. Every tensor is checked (names and shapes, all of them) against the
port's abstract parameters (`jax.eval_shape`, nothing compiled) before anything is converted.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.fileio import replaced_folder
from cdd_jax.models.diffusers import MODEL_CLASSES, from_config
from cdd_jax.models.diffusers.blocks import canonical_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"  # written into exported configs
# diffusers module lists: linen names their entries `<list>_<i>`.
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions",
                        "transformer_blocks", "downsamplers", "upsamplers", "to_out", "net"})
# Pre-0.14 attention names some checkpoints (old VAEs, google/ddpm-*) still carry.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                         "proj_attn": "to_out.0"}
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                          beta_end=0.02, prediction_type="epsilon", steps_offset=0)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SHOW = 8  # tensors named per category in a mismatch error


# ---------------------------------------------------------------- name and layout mapping


def torch_name(path: tuple[str, ...]) -> str:
    """Linen parameter path -> diffusers state-dict key (the exporter's mapping)."""
    parts = []
    for seg in path[:-1]:
        base, _, idx = seg.rpartition("_")
        parts.extend([base, idx] if base in LIST_NAMES and idx.isdigit() else [seg])
    leaf = path[-1]
    if leaf not in ("kernel", "scale", "bias"):
        raise ValueError(f"unexpected parameter {'/'.join(path)}")
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def flax_path(name: str, ndim: int) -> tuple[str, ...]:
    """diffusers state-dict key -> linen parameter path (the importer's mapping)."""
    segs = name.split(".")
    path: list[str] = []
    for seg in segs[:-1]:
        if seg.isdigit() and path:
            path[-1] = f"{path[-1]}_{seg}"
        else:
            path.append(seg)
    leaf = {"bias": "bias", "weight": "scale" if ndim == 1 else "kernel"}.get(segs[-1])
    if leaf is None:
        raise ValueError(f"tensor {name!r} is neither a weight nor a bias")
    return (*path, leaf)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    if x.ndim == 2:  # (in, out) -> (out, in)
        return np.ascontiguousarray(x.T)
    return np.ascontiguousarray(x)


def to_flax_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # OIHW -> HWIO
        return x.transpose(2, 3, 1, 0)
    return x.T if x.ndim == 2 else x


def torch_shape(flax_shape: tuple) -> tuple:
    return tuple(to_torch_layout(np.empty(flax_shape, np.uint8)).shape)


def flat_params(tree) -> dict[tuple[str, ...], Any]:
    """{("down_blocks_0", "resnets_0", "conv1", "kernel"): leaf, ...} of a params tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): v for path, v in flat}


def abstract_params(module: nn.Module):
    """The module's parameters as ShapeDtypeStructs (boxed with logical axes), nothing compiled
    and no backend started (the key is abstract too)."""
    return jax.eval_shape(lambda r: module.init(r, *module.example_inputs()),
                          jax.eval_shape(jax.random.key, 0))["params"]


def random_params(module: nn.Module, seed: int = 0, scale: float = 0.1) -> dict:
    """Random float32 numpy parameters of the port's shapes: nothing compiled (compiling flax's
    initialisers costs ~1 min of XLA:CPU time for a U-Net) and no JAX backend started (a process
    may still split its CPU into devices after). Norm scales 1 + N(0, 0.05^2), everything else
    N(0, scale^2). For stand-in teachers in tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1.0 + np.float32(0.05) * noise
        return np.float32(scale) * noise

    return jax.tree_util.tree_map_with_path(draw, _shapes(type(module), module.config_json))


def expected_tensors(module: nn.Module) -> dict[str, tuple]:
    """diffusers key -> torch shape of every tensor the port holds (via the exporter mapping)."""
    return dict(_expected_tensors(type(module), module.config_json))


@functools.lru_cache(maxsize=32)
def _shapes(cls, config_json: str):
    """The unboxed abstract parameters of a port's config (shapes: dtype-independent); tracing a
    U-Net takes seconds, and exporting stand-in weights needs them twice."""
    return nn.unbox(abstract_params(cls(config_json)))


@functools.lru_cache(maxsize=32)
def _expected_tensors(cls, config_json: str) -> tuple:
    leaves = flat_params(_shapes(cls, config_json))
    return tuple((torch_name(p), torch_shape(v.shape)) for p, v in leaves.items())


def _describe(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    more = f" (and {len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return f"{len(names)} {kind}: {shown}{more}"


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    """ValueError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shaped = sorted(f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
                    for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    problems = [_describe(kind, names) for kind, names in
                (("missing tensors", missing), ("unexpected tensors", extra),
                 ("mis-shaped tensors", shaped)) if names]
    if problems:
        raise ValueError(f"{where} does not match the port: " + "; ".join(problems))


def canonical_json(config: dict) -> str:
    """A diffusers model config as canonical JSON (defaults filled in, private keys dropped), so
    that two configs describing the same architecture compare equal as text."""
    name = config.get("_class_name", "UNet2DModel")
    if name not in MODEL_CLASSES:
        raise ValueError(f"unsupported diffusers model class {name!r}")
    return canonical_config(name, MODEL_CLASSES[name].DEFAULTS, config)


# ---------------------------------------------------------------- locating a model folder


def _snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=allow_patterns)


def looks_like_hub_id(text: str) -> bool:
    """True for "name" or "owner/name" that is not written as a local path."""
    text = str(text)
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    return not local and bool(_HUB_ID.fullmatch(text))


def resolve(path: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (one clear error if not)."""
    text = os.path.expanduser(str(path))
    local = Path(text)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{text} is a file; expected a diffusers model or pipeline folder")
        return local
    if not looks_like_hub_id(text):
        raise ValueError(f"no such directory: {text} (and it is not a Hugging Face hub id)")
    try:
        return Path(_snapshot_download(text, allow_patterns))
    except ImportError as e:
        cause = f"huggingface_hub is not installed ({e})"
    except Exception as e:  # noqa: BLE001 - offline, not found, gated, ...: one clear error
        cause = f"{type(e).__name__}: {e}"
    raise ValueError(f"{text!r} is not a local directory and could not be fetched from the "
                     f"Hugging Face hub: {cause}")


def _model_dir(path, subfolder: str | None) -> Path:
    sub = f"{subfolder}/" if subfolder else ""
    root = resolve(path, [f"{sub}*.json", f"{sub}diffusion_pytorch_model*.safetensors"])
    model_dir = root / subfolder if subfolder else root
    if not model_dir.is_dir():
        raise ValueError(f"{root} has no subfolder {subfolder!r}")
    if not (model_dir / CONFIG_NAME).is_file():
        if (model_dir / "model_index.json").is_file():
            subs = sorted(p.name for p in model_dir.iterdir() if (p / CONFIG_NAME).is_file())
            raise ValueError(f"{model_dir} is a diffusers pipeline folder; pass subfolder= one "
                             f"of {subs}")
        raise ValueError(f"{model_dir} is not a diffusers model folder: {CONFIG_NAME} is missing")
    return model_dir


def _read_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{model_dir / CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"{model_dir / CONFIG_NAME} is not a diffusers model config "
                         "(no _class_name)")
    if config["_class_name"] not in MODEL_CLASSES:
        raise ValueError(f"{model_dir} holds a {config['_class_name']!r}; the cdd_jax ports "
                         f"are {', '.join(MODEL_CLASSES)}")
    return config


def _read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if (model_dir / WEIGHTS_NAME).is_file():
        files = [model_dir / WEIGHTS_NAME]
    elif (model_dir / INDEX_NAME).is_file():
        weight_map = json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        others = sorted(p.name for p in model_dir.iterdir()
                        if p.suffix in (".bin", ".safetensors", ".ckpt", ".pt"))
        hint = f" (found {others}; only safetensors is read)" if others else ""
        raise ValueError(f"{model_dir} is not a diffusers model folder: {WEIGHTS_NAME} is "
                         f"missing{hint}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise ValueError(f"cannot read {f} as safetensors: {e}") from e
    return tensors


def _rename_deprecated(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old attention names (query/key/value/proj_attn, 1x1-conv shaped) -> current ones."""
    out = {}
    for name, x in tensors.items():
        *mod, attr, kind = name.split(".")
        if attr in _DEPRECATED_ATTENTION and mod and mod[-2:-1] == ["attentions"]:
            name = ".".join([*mod, _DEPRECATED_ATTENTION[attr], kind])
            if x.ndim == 4 and x.shape[2:] == (1, 1):
                x = x[:, :, 0, 0]
        out[name] = x
    return out


# ---------------------------------------------------------------- public API


def load_diffusers(path: str | os.PathLike, subfolder: str | None = None, *,
                   dtype: Any = jnp.float32, remat: bool = False) -> tuple[nn.Module, dict]:
    """Reads a diffusers model folder (or pipeline folder + subfolder, or hub id).

    Returns (module, params): the linen port (compute `dtype`, params float32) and its
    parameters, ready for `module.apply({"params": params}, ...)`; the matching cdd_jax
    `model` section is `cdd_jax.models.backbone.model_section_for(module)` (U-Nets) and the
    schedule and prediction type are `read_scheduler_config(pipeline)`. Raises ValueError naming
    every missing, extra or mis-shaped tensor, or the unsupported config entry, before any
    array is converted or any computation compiled.
    """
    model_dir = _model_dir(path, subfolder)
    module = from_config(_read_config(model_dir), dtype=dtype, remat=remat)
    tensors = _rename_deprecated(_read_tensors(model_dir))
    check_tensors(expected_tensors(module), {k: v.shape for k, v in tensors.items()},
                  str(model_dir))
    params: dict = {}
    for name, x in tensors.items():
        *parents, leaf = flax_path(name, x.ndim)
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(to_flax_layout(np.asarray(x, np.float32)))
    return module, params


def save_diffusers(module: nn.Module, params: dict, out_dir: str | os.PathLike) -> Path:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` that diffusers loads.

    Written into a temporary sibling folder and renamed into place, so `out_dir` is never left
    half-written (an existing `out_dir` is replaced).
    """
    params = nn.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    leaves = flat_params(params)
    tensors = {torch_name(p): to_torch_layout(np.asarray(v)) for p, v in leaves.items()}
    check_tensors(expected_tensors(module), {k: v.shape for k, v in tensors.items()},
                  "the parameters to export")
    config = {**module.config, "_diffusers_version": DIFFUSERS_VERSION}

    from safetensors.numpy import save_file

    out = Path(out_dir)
    with replaced_folder(out) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_scheduler_config(pipeline_dir: str | os.PathLike) -> dict:
    """The schedule facts of a pipeline's `scheduler/scheduler_config.json`.

    Keys: num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type,
    steps_offset (diffusers' DDPMScheduler defaults where absent) and `_class_name`.
    """
    root = resolve(pipeline_dir, ["scheduler/*.json"])
    for candidate in (root / "scheduler" / "scheduler_config.json",
                      root / "scheduler_config.json"):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            out = {k: cfg.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}
            out["_class_name"] = cfg.get("_class_name")
            if cfg.get("trained_betas") is not None:
                raise ValueError(f"{candidate}: trained_betas schedules are not supported")
            return out
    raise ValueError(f"{root} has no scheduler/scheduler_config.json")
