"""Issue 18, acceptance 2: the accelerator recipe (`configs/sr.py:sd`: SD 1.5 at 512 px, bf16,
FSDP over 8 devices, remat) builds, shards and compiles its CoDi train step under 8 simulated
CPU devices with a stand-in teacher of SD 1.5's block structure; parameter and activation
shardings are logged; the recipe's bad inputs are named before anything compiles."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import pytest
from tiny_sd import make_sd15_standin

from cdd_jax.config.validate import validate_config
from cdd_jax.parallel.sharding import batch_sharding
from cdd_jax.stages.distill import distill_job
from cdd_jax.stages.teacher import load_teacher, resolve_teacher
from cdd_jax.train.builder import build_train_step
from configs.sr import get_config


def _recipe(folder):
    c = get_config("sd")
    assert (c.model.dtype, c.model.remat, tuple(c.mesh.sizes)) == ("bfloat16", True, (-1, 8, 1))
    assert c.data.crop_size == 512 and c.model.prompt_embed_dim == 768
    c.teacher.checkpoint = str(folder)
    c.model.prompt_embed_dim = 16  # the stand-in's width (SD 1.5: 768)
    c.data.update(crop_size=64, batch_size=8, source="bundled", num_eval_crops=8)
    c.mesh.min_shard_bytes = 0  # shard the stand-in's small tensors as SD's large ones would be
    return c


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 549 s alone on 2 cores (6.5 GB); over 600 s beside other jobs
def test_sd_recipe_builds_shards_and_compiles_on_8_devices(tmp_path, caplog):
    assert jax.device_count() == 8
    config = _recipe(make_sd15_standin(tmp_path / "sd15"))
    validate_config(config)
    resolve_teacher(config)
    assert config.model.latent_factor == 8
    teacher = load_teacher(config, str(tmp_path))
    size = config.data.crop_size
    eval_set = {"image": jnp.zeros((8, size, size, 3)), "cond": jnp.zeros((8, size, size, 3))}
    job, _, _ = distill_job(config, teacher, eval_set)
    step = build_train_step(job, config)
    batch = job.prepare_batch({"image": jnp.zeros((8, size, size, 3)),
                               "cond": jnp.zeros((8, size, size, 3))})  # images -> latents
    batch = jax.device_put(batch, batch_sharding(step.mesh))
    with caplog.at_level(logging.INFO):
        step.compile(batch)
    specs = {jax.tree_util.keystr(p): s.spec
             for p, s in jax.tree_util.tree_leaves_with_path(step.state_shardings.params)}
    fsdp = [k for k, s in specs.items() if "fsdp" in str(s)]
    logging.info("parameter shardings: %d of %d leaves over fsdp, e.g. %s", len(fsdp),
                 len(specs), {k: str(specs[k]) for k in fsdp[:4]})
    hlo = step.compiled.as_text()
    constraints = hlo.count("sharding={devices=")
    logging.info("activation shardings: %d sharded values in the compiled step", constraints)
    assert len(fsdp) > len(specs) // 4  # the U-Net, control encoder and VAE kernels
    assert any("['control']" in k for k in fsdp) and any("['unet']" in k for k in fsdp)
    assert constraints > 0
    assert step.info()["flops_per_step"] > 0


def test_sd_recipe_bad_inputs_are_named_before_compile(tmp_path):
    folder = make_sd15_standin(tmp_path / "sd15")
    c = _recipe(folder)
    c.diffusion.prediction_type = "v_prediction"
    c.teacher.pretrain.diffusion.prediction_type = "v_prediction"
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        resolve_teacher(c)
    c = _recipe(folder)
    c.model.prompt_embed_dim = 768
    with pytest.raises(ValueError, match="prompt_embed_dim"):
        resolve_teacher(c)
    c = _recipe(folder)
    c.model.latent_channels = 16
    with pytest.raises(ValueError, match="latent_channels"):
        resolve_teacher(c)
