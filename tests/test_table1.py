"""Table 1 driver: the finetune objective's defining property, the row plan, resuming, the report.

The driver tests stub the training (`table1.distill`, `table1.load_teacher`) and the network
(`table1.conditional_model`) so they check the driver's logic in seconds; one slow test runs the
whole tiny table for real, then resumes it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdd_jax.config import presets
from cdd_jax.config.validate import validate_config
from cdd_jax.diffusion import get_schedule
from cdd_jax.distill.config import distill_config
from cdd_jax.distill.diffusion_loss import diffusion_loss
from cdd_jax.distill.objectives import compute_loss
from cdd_jax.evaluate import table1 as table1_eval
from cdd_jax.models.apply import conditional_apply_fn, unet_apply_fn
from cdd_jax.models.backbone import backbone_from_config, model_config, timestep_scale
from cdd_jax.models.control import ConditionalUNet, control_config, init_from_teacher
from cdd_jax.models.unet import init_params
from cdd_jax.parallel.sharding import unbox
from cdd_jax.stages import table1
from cdd_jax.stages.teacher import SHIPPED_TEACHER

# ----------------------------------------------------------------------------------------------
# finetune == pretraining loss while the gates are closed
# ----------------------------------------------------------------------------------------------


def _tiny_model_cfg():
    m = model_config()
    m.ch, m.ch_mult, m.attn_resolutions, m.num_groups = 8, (1, 2), (8,), 4
    return m


@pytest.mark.parametrize("gate", ["scalar", "conv1x1"])
def test_finetune_reduces_to_the_pretraining_loss_when_the_gates_are_zero(gate):
    size, batch = 16, 4
    mcfg, ccfg = _tiny_model_cfg(), control_config()
    ccfg.gate, ccfg.cond_embed_ch = gate, (8,)
    unet = backbone_from_config(mcfg, size)
    model = ConditionalUNet.from_config(mcfg, ccfg, image_size=size)
    # A teacher whose output is not zero (the fresh U-Net's output conv is zero-initialised).
    teacher = unbox(init_params(unet, jax.random.key(0), size))
    leaves, tree = jax.tree.flatten(teacher)
    rs = np.random.RandomState(1)
    teacher = jax.tree.unflatten(
        tree, [x + 0.05 * rs.standard_normal(x.shape).astype(np.float32) for x in leaves]
    )
    c0 = jnp.zeros((1, size, size, 3))
    fresh = unbox(
        jax.jit(model.init)({"params": jax.random.key(2)}, c0, jnp.zeros((1,)), c0)["params"]
    )
    cond_params = init_from_teacher(fresh, teacher)

    rng = jax.random.key(3)
    x = jax.random.uniform(jax.random.key(4), (batch, size, size, 3), minval=-1, maxval=1)
    cond = jax.random.uniform(jax.random.key(5), (batch, size, size, 3), minval=-1, maxval=1)
    schedule = get_schedule("cosine")
    cfg = distill_config()
    cfg.objective = "finetune"

    def cond_loss(p):
        return compute_loss(
            conditional_apply_fn(model), p, {"image": x, "cond": cond}, rng, schedule=schedule,
            cfg=cfg
        )[0]

    def uncond_loss(p):
        return diffusion_loss(unet_apply_fn(unet, timestep_scale(mcfg)), p, {"image": x}, rng,
                              schedule=schedule)[0]

    l_cond, g_cond = jax.jit(jax.value_and_grad(cond_loss))(cond_params)
    l_unc, g_unc = jax.jit(jax.value_and_grad(uncond_loss))(teacher)
    assert float(l_unc) > 1e-3
    np.testing.assert_allclose(float(l_cond), float(l_unc), rtol=1e-5)
    # Same loss surface for the backbone: its gradients are the pretraining gradients.
    for a, b in zip(jax.tree.leaves(g_cond["unet"]), jax.tree.leaves(g_unc), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The gates do get a gradient (the condition can enter), and opening them changes the loss.
    gate_grads = [
        g
        for path, g in jax.tree_util.tree_leaves_with_path(g_cond["control"])
        if "gate" in jax.tree_util.keystr(path)
    ]
    assert gate_grads and max(float(jnp.abs(g).max()) for g in gate_grads) > 0
    opened = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 if "gate" in jax.tree_util.keystr(path) else p, cond_params
    )
    assert abs(float(jax.jit(cond_loss)(opened)) - float(l_unc)) > 1e-4


# ----------------------------------------------------------------------------------------------
# Configuration and the GD plan
# ----------------------------------------------------------------------------------------------


def test_table1_configs_validate_and_bad_values_are_named():
    for variant in ("default", "tiny"):
        cfg = presets.table1_config(variant)
        validate_config(cfg)
        assert cfg.stage == "table1" and tuple(cfg.table1.rows) == table1_eval.ROWS
    assert presets.table1_config("default").teacher.checkpoint == SHIPPED_TEACHER
    cfg = presets.table1_config("tiny")
    cfg.table1.rows = ("codi", "ldm")
    with pytest.raises(ValueError, match="table1.rows"):
        validate_config(cfg)
    cfg = presets.table1_config("tiny")
    cfg.table1.plot_metrics = ("lpips_alex",)
    with pytest.raises(ValueError, match="plot_metrics"):
        validate_config(cfg)
    cfg = presets.table1_config("tiny")
    cfg.table1.codi_steps = (4, 0)
    with pytest.raises(ValueError, match="codi_steps"):
        validate_config(cfg)
    cfg = presets.table1_config("tiny")
    cfg.table1.unknown_field = 1
    with pytest.raises(ValueError, match="table1.unknown_field"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "num_steps,rounds,student,expected",
    [
        (600, 2, 4, [(16, 300), (8, 300)]),
        (10, 3, 4, [(32, 3), (16, 3), (8, 4)]),
        (5, 1, 2, [(4, 5)]),
    ],
)
def test_gd_plan_halves_teacher_steps_and_splits_the_budget(num_steps, rounds, student, expected):
    cfg = presets.table1_config("tiny")
    cfg.train.num_steps, cfg.table1.gd_rounds, cfg.table1.gd_student_steps = (
        num_steps,
        rounds,
        student,
    )
    plan = table1_eval.gd_plan(cfg)
    assert plan == expected
    assert sum(s for _, s in plan) == num_steps  # the same budget as every other row
    assert plan[-1][0] == 2 * student  # the last round's student takes `student` steps


def test_row_config_overrides_only_the_row_and_leaves_the_table_config_alone():
    cfg = presets.table1_config("tiny")
    row = table1.row_config(cfg, "gd", num_grid_steps=16, num_steps=3)
    assert (row.stage, row.distill.objective, row.distill.num_grid_steps, row.train.num_steps) == (
        "sr",
        "gd",
        16,
        3,
    )
    assert (cfg.stage, cfg.distill.objective, cfg.train.num_steps) == ("table1", "codi", 4)


def test_check_claims_reports_both_directions():
    cfg = presets.table1_config("default")

    def row(m, s, k, v):
        return dict(
            method=m,
            sampler=s,
            steps=k,
            metric="lpips_alex",
            value=v,
            seconds_per_image=0.0,
            n_images=1,
        )

    rows = [
        row("finetune", "ddim", 200, 0.25),
        row("finetune", "ddim", 4, 0.30),
        row("cm", "consistency", 4, 0.20),
        row("direct_cm", "consistency", 4, 0.28),
        row("codi", "ddim", 4, 0.26),
    ]
    lines = table1_eval.check_claims(rows, cfg)
    assert "+4.0% (within 5%" in lines[0]
    assert any("finetune (ddim)" in s and "(better)" in s for s in lines)
    assert any("cm (consistency)" in s and "NOT better" in s for s in lines)
    assert any("direct_cm (consistency)" in s and "(better)" in s for s in lines)
    assert any(s.startswith("Direct CM-4 vs CM-II-4: 0.2800 vs 0.2000 (worse") for s in lines)
    rows[-2] = row("direct_cm", "consistency", 4, 0.18)
    assert any("0.1800 vs 0.2000 (NOT worse" in s for s in table1_eval.check_claims(rows, cfg))
    rows[-1] = row("codi", "ddim", 4, 0.27)
    assert "NOT within 5%" in table1_eval.check_claims(rows, cfg)[0]
    assert "not checked" in table1_eval.check_claims(rows[:1], cfg)[0]


# ----------------------------------------------------------------------------------------------
# The driver with stubbed training: every row once, then resuming skips finished rows
# ----------------------------------------------------------------------------------------------


class _StubTraining:
    """Replaces training by a record of the calls; the 'network' is v_hat = w * z_t."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        self.teacher_calls = 0
        self.returned: list[dict] = []
        monkeypatch.setattr(table1, "distill", self.distill)
        monkeypatch.setattr(table1, "load_teacher", self.load_teacher)
        monkeypatch.setattr(table1, "conditional_model", lambda config: (None, self.apply_fn))

    @staticmethod
    def apply_fn(params, z, t, cond, rng):
        return params["w"] * z + 0.0 * cond

    def load_teacher(self, config, workdir):
        self.teacher_calls += 1
        return {"teacher": np.zeros(())}

    def distill(
        self, cfg, run_dir, teacher_params, eval_set, *, finetuned_params=None, initial_params=None
    ):
        self.calls.append(
            dict(
                objective=cfg.distill.objective,
                run_dir=run_dir,
                n=cfg.distill.num_grid_steps,
                steps=cfg.train.num_steps,
                teacher=teacher_params,
                finetuned=finetuned_params,
                initial=initial_params,
            )
        )
        params = {"w": jnp.float32(0.1 * len(self.calls))}
        self.returned.append(params)
        return params, self.apply_fn, None


def _key(r):
    return (r["method"], r["sampler"], r["steps"], r["metric"])


def test_driver_trains_every_row_once_then_resumes_only_missing_rows(tmp_path, monkeypatch):
    stub = _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")
    cfg.train.num_steps = 6  # GD: 3 + 3
    workdir = str(tmp_path)
    rows = table1.run_table1(cfg, workdir)

    # Training: finetune from the teacher; CM and both GD rounds from the fine-tuned model.
    objectives = [(c["objective"], c["n"], c["steps"]) for c in stub.calls]
    n = cfg.distill.num_grid_steps
    assert objectives == [
        ("finetune", n, 6),
        ("cm", n, 6),
        ("gd", 16, 3),
        ("gd", 8, 3),
        ("pe_codi", n, 6),
        ("codi", n, 6),
        ("direct_cm", n, 6),
    ]
    ft, cm, gd1, gd2 = stub.returned[0], *stub.calls[1:4]
    assert cm["finetuned"] is ft and cm["initial"] is ft and cm["teacher"] is None
    assert gd1["finetuned"] is ft and gd1["initial"] is ft and gd1["teacher"] is None
    assert gd2["finetuned"] is stub.returned[2] and gd2["initial"] is stub.returned[2]
    assert gd2["run_dir"] == os.path.join(workdir, "gd", "round2_N8")
    assert stub.teacher_calls == 1

    # Rows: every method and step count, each with every metric, in table order.
    methods = []
    for r in rows:
        if (r["method"], r["sampler"], r["steps"]) not in methods:
            methods.append((r["method"], r["sampler"], r["steps"]))
    assert methods == [
        ("bicubic", "none", 0),
        ("finetune", "ddim", 8),
        ("finetune", "ddim", 4),
        ("finetune", "dpmpp_2m", 4),
        ("cm", "consistency", 4),
        ("gd", "ddim", 4),
        ("pe_codi", "ddim", 4),
        ("codi", "ddim", 1),
        ("codi", "ddim", 4),
        ("direct_cm", "consistency", 4),
    ]
    assert {r["metric"] for r in rows} == {"psnr", "ssim", "lr_mse", "lr_psnr"}
    assert len(rows) == 4 * len(methods)
    for name in ("table1.md", "table1.json", "table1_quality_vs_nfe.png", "table1_grid.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    with open(os.path.join(workdir, "table1.json")) as f:
        assert [_key(r) for r in json.load(f)] == [_key(r) for r in rows]
    md = open(os.path.join(workdir, "table1.md")).read()
    assert "| codi | ddim | 4 |" in md and "CM-II" in md
    assert "| direct_cm | consistency | 4 |" in md and "Direct CM targets: 32 DDIM steps" in md

    # Resume: only the row whose results are missing is trained and evaluated again.
    os.remove(os.path.join(workdir, "codi", "eval.json"))
    stub.calls.clear()
    rows2 = table1.run_table1(cfg, workdir)
    assert [c["objective"] for c in stub.calls] == ["codi"]
    assert [_key(r) for r in rows2] == [_key(r) for r in rows]
    before = {_key(r): r["value"] for r in rows if r["method"] != "codi"}
    after = {_key(r): r["value"] for r in rows2 if r["method"] != "codi"}
    assert before == after

    # Nothing missing: nothing trained. Settings that do not change results may differ.
    stub.calls.clear()
    cfg.train.log_every = 1
    cfg.evaluate.num_grid_images = 2
    table1.run_table1(cfg, workdir)
    assert stub.calls == []
    # A row's own table1 fields concern that row only (the rows before it pass the check).
    cfg.table1.codi_steps = (1, 2, 4)
    with pytest.raises(ValueError, match=r"codi/eval.json .*codi_steps: \[1, 4\] -> \[1, 2, 4\]"):
        table1.run_table1(cfg, workdir)
    assert stub.calls == []
    cfg.table1.codi_steps = (1, 4)
    # A setting that changes results must not silently reuse old rows.
    cfg.seed = 1
    with pytest.raises(ValueError, match="different settings.*seed"):
        table1.run_table1(cfg, workdir)


def test_the_direct_cm_section_concerns_only_that_row(tmp_path):
    cfg = presets.table1_config("tiny")
    row_dir = str(tmp_path / "codi")
    codi, direct = (table1.result_settings(cfg, r) for r in ("codi", "direct_cm"))
    assert "distill.direct_cm.num_teacher_steps" in direct
    assert not any(k.startswith("distill.direct_cm.") for k in codi)
    # eval.json written before the Direct CM row existed kept that section for every row.
    table1.save_row(row_dir, [], {}, {**codi, "distill.direct_cm.num_teacher_steps": 16})
    assert table1.load_finished_row(row_dir, codi, "codi") == ([], {})
    table1.save_row(row_dir, [], {}, {**codi, "distill.cm.eps_t_min": 0.5})
    with pytest.raises(ValueError, match="distill.cm.eps_t_min"):
        table1.load_finished_row(row_dir, codi, "codi")
    table1.save_row(row_dir, [], {}, {**direct, "distill.direct_cm.num_teacher_steps": 8})
    with pytest.raises(ValueError, match="num_teacher_steps: 8 -> 32"):
        table1.load_finished_row(row_dir, direct, "direct_cm")


@pytest.mark.parametrize("row", ["cm", "direct_cm"])  # both distil the fine-tuned model
def test_a_row_needing_the_finetuned_model_trains_it_without_evaluating_it(
    tmp_path, monkeypatch, row
):
    stub = _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")
    cfg.table1.rows = (row,)
    rows = table1.run_table1(cfg, str(tmp_path))
    assert [c["objective"] for c in stub.calls] == ["finetune", row]
    ft, call = stub.returned[0], stub.calls[1]
    assert call["finetuned"] is ft and call["initial"] is ft and call["teacher"] is None
    assert {r["method"] for r in rows} == {row}
    assert not os.path.exists(os.path.join(str(tmp_path), "finetune", "eval.json"))


# ----------------------------------------------------------------------------------------------
# One tiny table for real, then resumed
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 17.5 min measured under load ~3 on 2 cores
def test_tiny_table_end_to_end_and_resume(tmp_path, monkeypatch):
    import cdd_jax

    workdir = str(tmp_path)
    cfg = presets.table1_config("tiny")
    rows = cdd_jax.train_and_evaluate(cfg, workdir)
    for name in ("table1.md", "table1.json", "table1_quality_vs_nfe.png", "table1_grid.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert {r["method"] for r in rows} == set(table1_eval.ROWS)
    assert all(np.isfinite(r["value"]) for r in rows if r["metric"] in ("psnr", "ssim"))
    bicubic = {r["metric"]: r["value"] for r in rows if r["method"] == "bicubic"}
    assert 10 < bicubic["psnr"] < 60

    # Resume: a finished training run is reused (no training); a partial one resumes.
    calls = []
    real = table1.distill

    def spy(cfg, run_dir, *a, **k):
        calls.append(run_dir)
        return real(cfg, run_dir, *a, **k)

    monkeypatch.setattr(table1, "distill", spy)
    os.remove(os.path.join(workdir, "codi", "eval.json"))
    rows2 = table1.run_table1(cfg, workdir)
    assert calls == []
    codi = {_key(r): r["value"] for r in rows if r["method"] == "codi"}
    codi2 = {_key(r): r["value"] for r in rows2 if r["method"] == "codi"}
    assert codi.keys() == codi2.keys()
    np.testing.assert_allclose([codi2[k] for k in codi], list(codi.values()), rtol=1e-5)

    os.remove(os.path.join(workdir, "pe_codi", "eval.json"))
    ckdir = os.path.join(workdir, "pe_codi", "checkpoints")
    import shutil

    shutil.rmtree(os.path.join(ckdir, str(cfg.train.num_steps)))  # keep the step-2 checkpoint
    table1.run_table1(cfg, workdir)
    assert calls == [os.path.join(workdir, "pe_codi")]
    assert os.path.isdir(os.path.join(ckdir, str(cfg.train.num_steps)))
