"""A distillation teacher from a diffusers folder: `teacher.checkpoint=DIR` fills the model section
from the checkpoint, the conditional network built on it equals the teacher at initialisation, an
exported and re-imported teacher is bit-identical, and each bad teacher is a clear error before
anything compiles."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdd_jax.config.presets import pretrain_config, sr_config
from cdd_jax.convert import load_diffusers, save_diffusers
from cdd_jax.convert.pipeline import read_metadata, read_schedule
from cdd_jax.models.apply import conditional_apply_fn, unet_apply_fn
from cdd_jax.models.backbone import backbone_from_config, timestep_scale
from cdd_jax.models.control import ConditionalUNet, init_from_teacher
from cdd_jax.models.unet import init_params
from cdd_jax.stages.pretrain import export_teacher
from cdd_jax.stages.teacher import load_teacher, resolve_teacher

SIZE = 16


def _perturbed_params(model, seed=0):
    params = nn.meta.unbox(init_params(model, jax.random.key(seed), SIZE))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny unet2d teacher (perturbed random weights) exported as the pretraining stage does."""
    cfg = pretrain_config("tiny")
    model = backbone_from_config(cfg.model, SIZE)
    params = _perturbed_params(model)
    out = str(tmp_path_factory.mktemp("teacher") / "export")
    export_teacher(out, params, cfg, {"steps": 0, "note": "test teacher"})
    return out, model, params


def _job_config(checkpoint):
    cfg = sr_config("tiny")
    cfg.teacher.checkpoint = checkpoint
    cfg.control.anchor_precision = 0.0  # the paper's network: equal to the teacher at init
    return cfg


def test_export_is_a_diffusers_pipeline_folder(exported):
    out, model, _ = exported
    schedule = read_schedule(out)
    assert schedule["prediction_type"] == "v_prediction"
    assert schedule["beta_schedule"] == "squaredcos_cap_v2"  # diffusers' nearest to "cosine"
    assert schedule["cdd_jax_schedule"] == {"name": "cosine", "continuous": True}
    assert read_metadata(out)["note"] == "test teacher"
    index = json.loads(open(f"{out}/model_index.json").read())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["_class_name"] == "DDPMPipeline"


def test_teacher_checkpoint_fills_the_model_section(exported):
    out, model, params = exported
    cfg = _job_config(out)
    cfg.model.ch = 64  # ignored: the checkpoint's config.json decides the architecture
    resolve_teacher(cfg)
    assert json.loads(cfg.model.diffusers_config)["block_out_channels"] == [8, 16]
    assert cfg.model.num_train_timesteps == 1000
    loaded = load_teacher(cfg, "/nonexistent-workdir")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conditional_network_on_an_imported_teacher_equals_it_at_init(exported):
    out, _, _ = exported
    cfg = _job_config(out)
    resolve_teacher(cfg)
    teacher = load_teacher(cfg, "/nonexistent-workdir")
    cmodel = ConditionalUNet.from_config(cfg.model, cfg.control, image_size=SIZE)
    z = jax.random.normal(jax.random.key(3), (2, SIZE, SIZE, 3))
    c = jax.random.normal(jax.random.key(4), (2, SIZE, SIZE, 3))
    t = jnp.array([0.2, 0.8])
    fresh = nn.meta.unbox(cmodel.init(jax.random.key(5), z, t, c)["params"])
    cparams = init_from_teacher(fresh, teacher)
    backbone = backbone_from_config(cfg.model, SIZE)
    want = unet_apply_fn(backbone, timestep_scale(cfg.model))(teacher, z, t, None, None)
    got = conditional_apply_fn(cmodel)(cparams, z, t, c, None)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The time input really is t * num_train_timesteps: t in [0, 1] unscaled gives another output.
    raw = backbone.apply({"params": teacher}, z, t)
    assert float(jnp.abs(raw - want).max()) > 1e-3


def test_exported_and_reimported_teacher_is_bit_identical(exported, tmp_path):
    out, _, params = exported
    module, loaded = load_diffusers(out, subfolder="unet")
    save_diffusers(module, loaded, tmp_path / "again")
    _, again = load_diffusers(tmp_path / "again")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _edit_scheduler(out, tmp_path, **changes):
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(out, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return str(dst)


def test_epsilon_teacher_is_accepted_and_a_mismatch_is_named(exported, tmp_path):
    """An epsilon-prediction folder resolves when the config says epsilon; with the default
    v-prediction config it is a ValueError naming both and the fix, before anything is built."""
    folder = _edit_scheduler(exported[0], tmp_path, prediction_type="epsilon")
    cfg = _job_config(folder)
    with pytest.raises(ValueError, match="predicts 'epsilon'.*diffusion.prediction_type="
                                         "'v_prediction'.*prediction_type=epsilon"):
        resolve_teacher(cfg)
    cfg = _job_config(folder)
    cfg.diffusion.prediction_type = "epsilon"
    cfg.teacher.pretrain.diffusion.prediction_type = "epsilon"
    resolve_teacher(cfg)
    assert cfg.model.diffusers_config
    cfg = _job_config(exported[0])  # a v-prediction folder with an epsilon config
    cfg.diffusion.prediction_type = "epsilon"
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        resolve_teacher(cfg)
    cfg = _job_config(_edit_scheduler(exported[0], tmp_path / "x", prediction_type="flow"))
    with pytest.raises(ValueError, match="cannot read"):
        resolve_teacher(cfg)


def test_schedule_mismatch_is_a_clear_error(exported, tmp_path):
    cfg = _job_config(_edit_scheduler(exported[0], tmp_path, cdd_jax_schedule=None,
                                      beta_schedule="linear"))
    with pytest.raises(ValueError, match="'linear' schedule"):
        resolve_teacher(cfg)


def test_family_and_architecture_mismatches_are_named(exported):
    cfg = _job_config(exported[0])
    cfg.model.family = "cdd"
    with pytest.raises(ValueError, match="model.family='cdd'"):
        resolve_teacher(cfg)
    cfg = _job_config(exported[0])
    other = json.loads(json.dumps(backbone_from_config(cfg.model, 32).config))
    cfg.model.diffusers_config = json.dumps(other)
    with pytest.raises(ValueError, match="differs from the config.json"):
        resolve_teacher(cfg)


def test_reused_teacher_must_match_the_fields(exported):
    """A teacher found without resolve_teacher (e.g. reused from the workdir) is compared with
    the architecture the fields describe."""
    cfg = _job_config(exported[0])
    cfg.model.ch = 16
    with pytest.raises(ValueError, match="does not match config.model"):
        load_teacher(cfg, "/nonexistent-workdir")


def test_not_a_teacher_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cfg = _job_config(str(tmp_path))
    resolve_teacher(cfg)  # not a diffusers folder: nothing to fill in
    with pytest.raises((ValueError, FileNotFoundError), match=str(tmp_path)):
        load_teacher(cfg, "/nonexistent-workdir")


def test_the_previous_cdd_teacher_still_loads_as_family_cdd():
    """The teacher shipped before the model families (Orbax params, the "cdd" U-Net) reproduces
    the results published with it: it loads with model.family=cdd and is refused otherwise."""
    import os

    from cdd_jax.stages.teacher import SHIPPED_TEACHER

    old = os.path.join(os.path.dirname(SHIPPED_TEACHER), "teacher_cdd")
    cfg = sr_config("default")
    cfg.teacher.checkpoint = old
    cfg.model.family = "cdd"
    resolve_teacher(cfg)  # not a diffusers folder: nothing to fill in
    params = load_teacher(cfg, "/nonexistent-workdir")
    assert {"time_embed", "encoder", "middle", "decoder"} <= set(params)
    cfg.model.family = "unet2d"
    with pytest.raises(ValueError, match="model.family: checkpoint 'cdd' vs config 'unet2d'"):
        load_teacher(cfg, "/nonexistent-workdir")


def test_an_imported_module_carries_its_model_section(exported):
    from cdd_jax.models.backbone import backbone_from_config, model_section_for

    module, params = load_diffusers(exported[0], subfolder="unet")
    section = model_section_for(module)
    assert section.family == "unet2d"
    rebuilt = backbone_from_config(section, SIZE)
    z = jax.random.normal(jax.random.key(0), (1, SIZE, SIZE, 3))
    np.testing.assert_array_equal(np.asarray(rebuilt.apply({"params": params}, z, 500.0)),
                                  np.asarray(module.apply({"params": params}, z, 500.0)))
