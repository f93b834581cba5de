"""The train state and the jitted step on the tiny configs: updates, EMAs, freezing, errors."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cdd_jax
from cdd_jax.config import presets
from cdd_jax.config.validate import validate_config
from cdd_jax.convert.pipeline import is_diffusers_folder
from cdd_jax.data.degradations import SRPairTransform
from cdd_jax.data.pipeline import build_train_dataset, make_eval_set
from cdd_jax.distill.ema import ema_decay
from cdd_jax.models.backbone import backbone_from_config
from cdd_jax.models.unet import init_params
from cdd_jax.parallel.sharding import unbox
from cdd_jax.stages.distill import distill_job
from cdd_jax.stages.pretrain import pretrain_job
from cdd_jax.train.builder import build_train_step
from cdd_jax.train.checkpoint import export_params


def _setup(job, config):
    """The loop's compiled step on one device (not donated, so states can be compared), called
    with an explicit rng: (state, step(state, batch, rng) -> (state, metrics), labels)."""
    built = build_train_step(job, config, donate=False, devices=jax.devices()[:1])

    def step(state, batch, rng):
        return built.jitted(state, batch, rng, built.finetuned, built.frozen_inputs)

    return built.state, step, built.labels


def _batch(config, task, sr=None, index=0):
    ds = build_train_dataset(config.data, task=task, sr_transform=sr)
    return {k: jnp.asarray(v) for k, v in ds[index].items()}


def _leaves_equal(a, b):
    return all(np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def pretrain_setup():
    config = presets.pretrain_config("tiny")
    job, _ = pretrain_job(config)
    state, step, labels = _setup(job, config)
    return config, job, state, step


def test_pretrain_step_updates_params_and_ema_by_formula(pretrain_setup):
    config, _, state0, step = pretrain_setup
    batch = _batch(config, "pretrain")
    s1, m1 = step(state0, batch, jax.random.key(1))
    s2, m2 = step(s1, _batch(config, "pretrain", index=1), jax.random.key(2))
    assert np.isfinite(float(m1["loss"])) and float(m1["finite"]) == 1.0
    assert int(s2.step) == 2
    # (the warm-up starts at learning rate 0, so the first update is zero)
    assert not _leaves_equal(s2.params, s1.params)
    # ema <- d ema + (1 - d) params, with d from the configured warm-up at the pre-update step.
    d0 = float(ema_decay(0, config.ema.decay, config.ema.warmup))
    d1 = float(ema_decay(1, config.ema.decay, config.ema.warmup))
    assert 0.0 < d1 < config.ema.decay
    for e0, e1, e2, p1, p2 in zip(*(jax.tree.leaves(t) for t in (
            state0.ema_params, s1.ema_params, s2.ema_params, s1.params, s2.params)), strict=True):
        np.testing.assert_allclose(e1, d0 * e0 + (1 - d0) * p1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e2, d1 * e1 + (1 - d1) * p2, rtol=1e-5, atol=1e-7)


def test_nonfinite_batch_skips_the_update_and_is_counted(pretrain_setup):
    config, _, state0, step = pretrain_setup
    batch = _batch(config, "pretrain")
    batch["image"] = batch["image"].at[0, 0, 0, 0].set(jnp.nan)
    s1, m1 = step(state0, batch, jax.random.key(1))
    assert float(m1["finite"]) == 0.0
    assert int(s1.nonfinite_steps) == 1 and int(s1.step) == 1
    assert _leaves_equal(s1.params, state0.params)
    assert _leaves_equal(s1.ema_params, state0.ema_params)
    assert _leaves_equal(s1.opt_state, state0.opt_state)


def _tiny_teacher(config, seed=0):
    model = backbone_from_config(config.model, config.data.crop_size)
    params = unbox(init_params(model, jax.random.key(seed), config.data.crop_size))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def sr_pieces():
    config = presets.sr_config("tiny")
    sr = SRPairTransform(config.degradation, config.data.crop_size)
    eval_set = make_eval_set(config.data, task="sr", sr_transform=sr, num_crops=8)
    return config, sr, eval_set, _tiny_teacher(config)


def test_pe_codi_freezes_the_backbone_exactly(sr_pieces):
    config, sr, eval_set, teacher = sr_pieces
    config = config.copy_and_resolve_references()
    config.distill.objective = "pe_codi"
    job, _, _ = distill_job(config, teacher, eval_set)
    state0, step, labels = _setup(job, config)
    s = state0
    for i in range(2):
        s, _ = step(s, _batch(config, "sr", sr, index=i), jax.random.key(i))
    assert _leaves_equal(s.params["unet"], state0.params["unet"])
    assert not _leaves_equal(s.params["control"], state0.params["control"])
    # No optimiser state for frozen parameters: the AdamW moments hold only control/ arrays.
    n_frozen = len(jax.tree.leaves(state0.params["unet"]))
    n_train = len(jax.tree.leaves(state0.params["control"]))
    opt_arrays = [x for x in jax.tree.leaves(s.opt_state) if x.ndim > 0]
    assert len(opt_arrays) == 2 * n_train, (len(opt_arrays), n_train, n_frozen)
    assert set(jax.tree.leaves(labels["unet"])) == {"frozen"}


def test_target_and_eval_ema_follow_their_own_decays(sr_pieces):
    config, sr, eval_set, teacher = sr_pieces
    job, _, _ = distill_job(config, teacher, eval_set)
    state0, step, _ = _setup(job, config)
    s1, _ = step(state0, _batch(config, "sr", sr), jax.random.key(0))
    s2, _ = step(s1, _batch(config, "sr", sr, index=1), jax.random.key(1))
    tcfg, ecfg = config.distill.target_ema, config.distill.eval_ema
    dt, de = float(ema_decay(1, tcfg.decay, tcfg.warmup)), float(ema_decay(1, ecfg.decay,
                                                                           ecfg.warmup))
    for t1, t2, e1, e2, p2 in zip(*(jax.tree.leaves(x) for x in (
            s1.target_params, s2.target_params, s1.ema_params, s2.ema_params, s2.params)),
            strict=True):
        np.testing.assert_allclose(t2, dt * t1 + (1 - dt) * p2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e2, de * e1 + (1 - de) * p2, rtol=1e-5, atol=1e-7)


def test_codi_loss_falls_over_a_few_dozen_steps(sr_pieces):
    """The paper's objective (lambda = 1, no low-frequency anchor) on the tiny SR config."""
    config, sr, eval_set, teacher = sr_pieces
    config = config.copy_and_resolve_references()
    config.distill.lambda_x = 1.0
    config.control.anchor_precision = 0.0
    config.optim.warmup_steps = 1
    config.optim.lr = config.optim.new_lr = 2e-3
    job, _, _ = distill_job(config, teacher, eval_set)
    state, step, _ = _setup(job, config)
    batch = _batch(config, "sr", sr)
    keys = jax.random.split(jax.random.key(1000), 6)  # fixed t and eps for the comparison

    @jax.jit
    def fixed_loss(s):  # lax.map: the loss is compiled once, not six times
        return jnp.mean(jax.lax.map(
            lambda k: job.loss_fn(s.params, s.target_params, None, batch, k)[0], keys))

    before = float(fixed_loss(state))
    for i in range(30):
        state, _ = step(state, batch, jax.random.key(i))
    after = float(fixed_loss(state))
    assert after < 0.85 * before, (before, after)


def test_unknown_config_key_is_named_with_close_matches():
    config = presets.pretrain_config("tiny")
    config.train.num_step = 5
    with pytest.raises(ValueError, match=r"train\.num_step.*did you mean train\.num_steps"):
        validate_config(config)


def test_out_of_range_values_fail_before_compilation():
    config = presets.pretrain_config("tiny")
    config.model.dropout = 1.5
    with pytest.raises(ValueError, match="dropout"):
        validate_config(config)
    config = presets.pretrain_config("tiny")
    config.diffusion.schedule = "cosin"
    with pytest.raises(ValueError, match="cosin"):
        validate_config(config)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    config = presets.sr_config("tiny")
    config.teacher.checkpoint = str(tmp_path / "no_such_teacher")
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        cdd_jax.train_and_evaluate(config, str(tmp_path / "wd"))


def test_mismatched_teacher_checkpoint_is_a_clear_error(tmp_path):
    config = presets.sr_config("tiny")
    other = config.model.copy_and_resolve_references()
    other.ch = 16
    export_params(str(tmp_path / "teacher"), {"w": np.zeros(3)}, {"model": other.to_dict()})
    config.teacher.checkpoint = str(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"model\.ch: checkpoint 16 vs config 8"):
        cdd_jax.train_and_evaluate(config, str(tmp_path / "wd"))


def test_pretrain_job_end_to_end(tmp_path):
    """The tiny pretraining job writes checkpoints, events, samples, config and an export."""
    config = presets.pretrain_config("tiny")
    config.train.sample_every = 3
    wd = str(tmp_path / "wd")
    params, meta = cdd_jax.train_and_evaluate(config, wd)
    assert meta["steps"] == config.train.num_steps
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
    assert glob.glob(os.path.join(wd, "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(wd, "samples"))) == ["0000003.png", "0000006.png"]
    assert os.path.exists(os.path.join(wd, "config_pretrain.json"))
    # The export is a diffusers pipeline folder holding exactly the returned (EMA) parameters.
    export = os.path.join(wd, "export")
    assert is_diffusers_folder(export)
    _, loaded = cdd_jax.load_diffusers(export, "unet")
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(meta["heldout_vloss_ema"])


@pytest.mark.slow
def test_sr_job_end_to_end_from_python(tmp_path):
    """`cdd_jax.train_and_evaluate` runs teacher -> CoDi -> evaluation (issue 4, point 3)."""
    import json

    config = presets.sr_config("tiny")
    config.teacher.pretrain.train.num_steps = 4
    wd = str(tmp_path / "wd")
    rows = cdd_jax.train_and_evaluate(config, wd)
    methods = {(r["method"], r["sampler"], r["steps"]) for r in rows}
    assert methods == {("bicubic", "none", 0), ("codi", "ddim-uniform", 1),
                       ("codi", "ddim-uniform", 2), ("codi", "ddim-uniform", 4),
                       ("codi", "fresh-uniform", 2), ("codi", "fresh-uniform", 4)}
    saved = json.load(open(os.path.join(wd, "eval", "results.json")))
    assert len(saved) == len(rows)
    assert os.path.exists(os.path.join(wd, "eval", "results.md"))
    assert os.path.exists(os.path.join(wd, "eval", "grid.png"))
    assert os.path.isdir(os.path.join(wd, "teacher", "export", "params"))
