"""The diffusers ports against diffusers itself (fixtures: make_diffusers_fixtures.py).

No torch needed: the fixtures hold diffusers' own `save_pretrained` folders and its outputs.
Relative error is max|ours - diffusers| / max|diffusers| over all elements, float32, CPU, JAX's
default matmul precision (no "highest" needed). Measured (jax 0.10 CPU vs diffusers 0.42.1 on
torch 2.13 CPU): unet2d 2.4e-6, unet2d_multihead 4.2e-7, unet_cond_conv 1.1e-6, unet_cond_linear
6.8e-7, vae mean 1.2e-6 / logvar 1.0e-6 / decoded 1.7e-6; the tolerance is 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cdd_jax.convert import diffusers as conv
from cdd_jax.convert import load_diffusers, read_scheduler_config, save_diffusers
from cdd_jax.models.diffusers import UNet2DConditionModel, from_config

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
MODELS = ["unet2d", "unet2d_multihead", "unet_cond_conv", "unet_cond_linear", "vae"]
TOL = 1e-4

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# The published config.json values of the full-size models (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1, unet/ and vae/).
FULL_SIZE_CONFIGS = {
    "sd15_unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64, "up_block_types": _SD_UP,
    },
    "sd21_unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": _SD_DOWN, "downsample_padding": 1, "dual_cross_attention": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "sample_size": 96, "up_block_types": _SD_UP, "upcast_attention": True,
        "use_linear_projection": True,
    },
    "sd_vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def run(module, params, io) -> dict[str, np.ndarray]:
    """The port (jitted: one compile is cheaper than op-by-op) on a fixture's inputs, NCHW."""
    v = {"params": params}
    if "latents" in io:
        encode = jax.jit(lambda v, x: module.apply(v, x, method="encode"))
        decode = jax.jit(lambda v, z: module.apply(v, z, method="decode"))
        post = encode(v, _nhwc(io["sample"]))
        return {"mean": _nchw(post.mean), "logvar": _nchw(post.logvar),
                "decoded": _nchw(decode(v, _nhwc(io["latents"])))}
    ctx = jnp.asarray(io["encoder_hidden_states"]) if "encoder_hidden_states" in io else None
    return {"out": _nchw(jax.jit(module.apply)(v, _nhwc(io["sample"]), io["timesteps"], ctx))}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_diffusers(FIXTURES / name) for name in MODELS}


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst, ignore=shutil.ignore_patterns("io.npz"))
    return dst


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / conv.WEIGHTS_NAME)


def _write_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, folder / conv.WEIGHTS_NAME)


# ---------------------------------------------------------------- numerics against diffusers


@pytest.mark.parametrize("name", MODELS)
def test_matches_diffusers(loaded, name):
    module, params = loaded[name]
    with np.load(FIXTURES / name / "io.npz") as f:
        io = dict(f)
    ours = run(module, params, io)
    errs = {k: rel_err(ours[k], io[k]) for k in ours}
    assert max(errs.values()) < TOL, errs


def test_vae_carries_scaling_factor(loaded):
    module, _ = loaded["vae"]
    assert module.scaling_factor == pytest.approx(0.18215)


def test_random_init_needs_no_checkpoint():
    module = from_config(dict(
        _class_name="UNet2DModel", block_out_channels=[8], down_block_types=["AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D"], layers_per_block=1, norm_num_groups=4,
        attention_head_dim=4))
    inputs = module.example_inputs(batch=2, size=4)
    # The rbg PRNG compiles ~4x faster than threefry on the CPU; init itself is the same code.
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), *inputs)["params"]
    kernel = params["down_blocks_0"]["attentions_0"]["to_q"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned)
    assert kernel.names == ("channels_in", "channels_out")
    out = jax.jit(module.apply)({"params": nn.unbox(params)}, inputs[0] + 1.0, 500)
    assert out.shape == (2, 4, 4, 3) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(out)) > 0


def _count_remat(jaxpr) -> int:
    """Rematerialised (jax.checkpoint) calls in a jaxpr, nested ones included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += _count_remat(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count_remat(sub)
    return n


def test_remat_wraps_every_resnet_and_transformer_block(loaded):
    module, params = loaded["unet_cond_linear"]
    inputs = module.example_inputs(batch=1, size=8, tokens=2)
    jaxpr = lambda m: jax.make_jaxpr(lambda p: m.apply({"params": p}, *inputs))(params).jaxpr
    remat = UNet2DConditionModel(module.config_json, remat=True)
    # resnets: down 2+1+1, mid 2, up 2+2+3; transformer layers: down 2*2+1, mid 1, up 2+3*2.
    assert (_count_remat(jaxpr(module)), _count_remat(jaxpr(remat))) == (0, 13 + 14)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["unet2d", "unet_cond_linear", "vae"])
def test_import_export_import_is_bit_identical(loaded, tmp_path, name):
    module, params = loaded[name]
    out = save_diffusers(module, params, tmp_path / "export")
    module2, params2 = load_diffusers(out)
    assert module2.config == module.config
    a, b = conv.flat_params(params), conv.flat_params(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    # The exported tensors are diffusers' own, bit for bit.
    original, exported = _tensors(FIXTURES / name), _tensors(out)
    assert original.keys() == exported.keys()
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left behind


def test_export_replaces_an_existing_folder(loaded, tmp_path):
    module, params = loaded["unet2d"]
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "stale.txt").write_text("old")
    save_diffusers(module, params, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", conv.WEIGHTS_NAME]


def test_export_rejects_params_of_another_model(loaded, tmp_path):
    module, _ = loaded["unet2d"]
    _, other = loaded["unet2d_multihead"]
    with pytest.raises(ValueError, match="missing tensors"):
        save_diffusers(module, other, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------- pipelines and schedulers


def test_pipeline_subfolders_and_scheduler(loaded, tmp_path):
    _copy("unet_cond_conv", tmp_path).rename(tmp_path / "unet")
    _copy("vae", tmp_path).rename(tmp_path / "vae")
    shutil.copytree(FIXTURES / "scheduler", tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    unet, params = load_diffusers(tmp_path, subfolder="unet")
    assert isinstance(unet, UNet2DConditionModel)
    ref = conv.flat_params(loaded["unet_cond_conv"][1])
    assert all(np.array_equal(v, ref[k]) for k, v in conv.flat_params(params).items())
    vae, _ = load_diffusers(tmp_path, subfolder="vae")
    assert vae.scaling_factor == pytest.approx(0.18215)
    sched = read_scheduler_config(tmp_path)
    assert sched == dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                         steps_offset=1, _class_name="DDPMScheduler")
    with pytest.raises(ValueError, match=r"pipeline folder; pass subfolder=.*unet.*vae"):
        load_diffusers(tmp_path)


def test_deprecated_attention_names_are_read(loaded, tmp_path):
    """Old checkpoints (early SD VAEs, google/ddpm-*) use query/key/value/proj_attn, some 1x1."""
    folder = _copy("vae", tmp_path)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in _tensors(folder).items():
        for new, dep in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                v = v[:, :, None, None] if v.ndim == 2 and dep == "query" else v
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    _write_tensors(folder, renamed)
    _, params = load_diffusers(folder)
    ref = conv.flat_params(loaded["vae"][1])
    assert all(np.array_equal(v, ref[k]) for k, v in conv.flat_params(params).items())


# ---------------------------------------------------------------- bad input


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model folder: config.json is missing"):
        load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is missing"):
        load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(ValueError, match="not a diffusers model config"):
        load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(ValueError, match="'ControlNetModel'.*UNet2DModel"):
        load_diffusers(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        load_diffusers(tmp_path / "nothing" / "here")


def test_unsupported_block_type(tmp_path):
    folder = _copy("unet2d", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"][1] = "SkipDownBlock2D"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SkipDownBlock2D.*DownBlock2D, AttnDownBlock2D"):
        load_diffusers(folder)


def test_unsupported_config_value():
    cfg = dict(FULL_SIZE_CONFIGS["sd15_unet"], class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        from_config(cfg)


@pytest.mark.parametrize("edit, message", [
    ("missing", r"1 missing tensors: conv_in\.weight"),
    ("extra", r"1 unexpected tensors: mid_block\.resnets\.0\.conv9\.weight"),
    ("shape", r"1 mis-shaped tensors: conv_out\.weight \(3, 16, 1, 3\) "
              r"\(expected \(3, 16, 3, 3\)\)"),
])
def test_mismatched_tensors_are_named(tmp_path, edit, message):
    folder = _copy("unet2d", tmp_path)
    tensors = _tensors(folder)
    if edit == "missing":
        del tensors["conv_in.weight"]
    elif edit == "extra":
        tensors["mid_block.resnets.0.conv9.weight"] = np.zeros((2, 2), np.float32)
    else:
        tensors["conv_out.weight"] = tensors["conv_out.weight"][:, :, :1]
    _write_tensors(folder, tensors)
    with pytest.raises(ValueError, match=message):
        load_diffusers(folder)


def test_many_mismatches_are_counted(tmp_path):
    folder = _copy("unet2d", tmp_path)
    tensors = {k: v for k, v in _tensors(folder).items() if not k.startswith("up_blocks")}
    _write_tensors(folder, tensors)
    with pytest.raises(ValueError, match=r"missing tensors: up_blocks.*\(and \d+ more\)"):
        load_diffusers(folder)


def test_unreachable_hub_id(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(conv, "_snapshot_download", offline)
    with pytest.raises(ValueError, match=r"'someone/sd-model'.*hub: ConnectionError: no route"):
        load_diffusers("someone/sd-model", subfolder="unet")

    def not_installed(repo_id, allow_patterns):
        raise ModuleNotFoundError("No module named 'huggingface_hub'")

    monkeypatch.setattr(conv, "_snapshot_download", not_installed)
    with pytest.raises(ValueError, match="'someone/sd-model'.*huggingface_hub is not installed"):
        read_scheduler_config("someone/sd-model")


# ---------------------------------------------------------------- full-size shape completeness


@pytest.mark.parametrize("name", sorted(FULL_SIZE_CONFIGS))
def test_full_size_configs_convert_shape_complete(name):
    module = from_config(FULL_SIZE_CONFIGS[name])
    boxed = conv.abstract_params(module)  # eval_shape: no weights
    names = {b.names for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))}  # every parameter carries the house's logical axes
    assert names == {("conv_h", "conv_w", "channels_in", "channels_out"),
                     ("channels_in", "channels_out"), ("channels_out",), ("norm",)}
    abstract = conv.flat_params(nn.unbox(boxed))
    exported = conv.expected_tensors(module)  # the exporter's mapping
    imported = {conv.flax_path(k, len(s)): conv.to_flax_layout(np.empty(s, np.uint8)).shape
                for k, s in exported.items()}  # the importer's mapping back
    assert imported == {p: v.shape for p, v in abstract.items()}
    # diffusers' own full-size state dicts (built on the meta device by the fixture script).
    reference = json.loads((FIXTURES / "full_size_keys.json").read_text())[name]
    conv.check_tensors(exported, {k: tuple(v) for k, v in reference.items()}, name)
    n_params = sum(int(np.prod(s)) for s in exported.values())
    assert n_params == {"sd15_unet": 859_520_964, "sd21_unet": 865_910_724,
                        "sd_vae": 83_653_863}[name]


def test_key_sets_match_live_diffusers():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    for name in ["unet2d", "unet_cond_linear", "vae"]:
        cfg = json.loads((FIXTURES / name / "config.json").read_text())
        model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv.check_tensors(conv.expected_tensors(from_config(cfg)), found, name)
