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
import scipy.stats

from cdd_jax.config import presets
from cdd_jax.config.validate import validate_config
from cdd_jax.diffusion import get_schedule
from cdd_jax.distill.config import distill_config
from cdd_jax.distill.diffusion_loss import diffusion_loss
from cdd_jax.distill.objectives import compute_loss
from cdd_jax.evaluate import seeds as seeds_stats
from cdd_jax.evaluate import table1 as table1_eval
from cdd_jax.evaluate import table1_report
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
    "order,num_steps,rounds,student,expected",
    [
        ("finetune_first", 600, 2, 4, [("round1_N16", True, "gd", 16, 300),
                                       ("round2_N8", True, "gd", 8, 300)]),
        ("finetune_first", 10, 3, 4, [("round1_N32", True, "gd", 32, 3),
                                      ("round2_N16", True, "gd", 16, 3),
                                      ("round3_N8", True, "gd", 8, 4)]),
        ("finetune_first", 5, 1, 2, [("round1_N4", True, "gd", 4, 5)]),
        # the paper's order: unconditional rounds, then the student is made conditional
        ("distillation_first", 600, 2, 4, [("uncond_round1_N16", False, "gd", 16, 200),
                                           ("uncond_round2_N8", False, "gd", 8, 200),
                                           ("conditional", True, "finetune", None, 200)]),
        ("distillation_first", 10, 2, 4, [("uncond_round1_N16", False, "gd", 16, 3),
                                          ("uncond_round2_N8", False, "gd", 8, 3),
                                          ("conditional", True, "finetune", None, 4)]),
    ],
)
def test_gd_plan_halves_teacher_steps_and_splits_the_budget(
    order, num_steps, rounds, student, expected
):
    cfg = presets.table1_config("tiny")
    cfg.train.num_steps, cfg.table1.gd_rounds, cfg.table1.gd_student_steps = (
        num_steps,
        rounds,
        student,
    )
    cfg.table1.gd_order = order
    plan = table1_eval.gd_plan(cfg)
    assert [tuple(p) for p in plan] == expected
    assert sum(p.num_steps for p in plan) == num_steps  # the same budget as every other row
    rounds_ = [p for p in plan if p.objective == "gd"]
    assert rounds_[-1].teacher_steps == 2 * student  # the last student takes `student` steps


def test_gd_order_and_seeds_are_validated():
    cfg = presets.table1_config("tiny")
    assert cfg.table1.gd_order == "distillation_first"  # the paper's order is the default
    assert tuple(presets.table1_config("default").table1.seeds) == (0, 1, 2)
    cfg.table1.gd_order = "distil_first"
    with pytest.raises(ValueError, match="table1.gd_order"):
        validate_config(cfg)
    for bad in ((), (0, 0), (-1,), (0.5,)):
        cfg = presets.table1_config("tiny")
        cfg.table1.seeds = bad
        with pytest.raises(ValueError, match="table1.seeds"):
            validate_config(cfg)
    cfg = presets.table1_config("tiny")
    cfg.train.num_steps = 2  # 3 GD runs distillation-first
    with pytest.raises(ValueError, match="3 GD phases"):
        validate_config(cfg)
    cfg.table1.gd_order = "finetune_first"  # 2 rounds
    validate_config(cfg)


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


def test_the_paper_table_is_held_once_as_the_spec_prints_it():
    """../shared/specs/codi.md section 7 (the paper's text): LPIPS and FID per method."""
    by_name = {(r.method.split(" (")[0], r.steps): (r.fid, r.lpips) for r in
               table1_eval.PAPER_TABLE1}
    assert by_name == {
        ("Real-ESRGAN", 1): (37.64, 0.3112), ("StableSR", 200): (24.44, 0.3114),
        ("LDM-SR", 4): (30.99, 0.3070), ("DPM-Solver", 4): (30.12, 0.3077),
        ("DPM-Solver++", 4): (30.03, 0.3073), ("CM", 4): (30.63, 0.3066),
        ("GD", 4): (27.81, 0.3172), ("PE-CoDi", 4): (25.21, 0.2941), ("CoDi", 4): (19.64, 0.2656),
        ("LDM-SR", 200): (18.63, 0.2551),
    }
    lp = table1_eval.PAPER_LPIPS
    rel = lp[("codi", "ddim", 4)] / lp[("finetune", "ddim", 200)] - 1
    assert rel == pytest.approx(0.041, abs=5e-4)  # "+4.1%"
    assert lp[("cm", "consistency", 4)] == 0.3066 and lp[("gd", "ddim", 4)] == 0.3172
    assert not any(k[2] in (250, 50) for k in lp)  # the paper has no 250- or 50-step rows


def test_t_interval_matches_scipy_and_a_hand_computation():
    # Hand: values 1, 2, 6: mean 3, s^2 = (4 + 1 + 9) / 2 = 7, t_{0.975, 2} = 4.302653,
    # half-width 4.302653 * sqrt(7 / 3) = 6.5724.
    mean, half = seeds_stats.t_interval([1.0, 2.0, 6.0])
    assert mean == 3.0 and half == pytest.approx(4.302653 * np.sqrt(7 / 3), rel=1e-6)
    assert half == pytest.approx(6.5724, abs=1e-4)
    v = np.array([0.21, 0.25, 0.24, 0.20])
    lo, hi = scipy.stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=scipy.stats.sem(v))
    mean, half = seeds_stats.t_interval(v)
    assert (mean - half, mean + half) == pytest.approx((lo, hi), rel=1e-10)
    assert np.isnan(seeds_stats.t_interval([0.3])[1])  # one seed: no interval


def _row(m, s, k, v, metric="lpips_alex"):
    return dict(method=m, sampler=s, steps=k, metric=metric, value=v, stderr=0.01,
                seconds_per_image=0.5, n_images=64)


def test_aggregate_seeds_gives_seed_means_intervals_and_the_per_seed_values():
    per_seed = {
        0: [_row("codi", "ddim", 4, 0.20), _row("cm", "consistency", 4, 0.30)],
        1: [_row("codi", "ddim", 4, 0.22), _row("cm", "consistency", 4, 0.28)],
        2: [_row("codi", "ddim", 4, 0.27)],  # cm missing for seed 2
    }
    rows = seeds_stats.aggregate_seeds(per_seed)
    codi, cm = rows
    assert (codi["method"], cm["method"]) == ("codi", "cm")  # first-seen order
    assert codi["seeds"] == [0, 1, 2] and codi["seed_values"] == [0.20, 0.22, 0.27]
    assert codi["value"] == pytest.approx(0.23) and codi["n_seeds"] == 3
    assert codi["ci95"] == pytest.approx(
        scipy.stats.t.ppf(0.975, 2) * np.std([0.20, 0.22, 0.27], ddof=1) / np.sqrt(3))
    assert cm["seeds"] == [0, 1] and cm["value"] == pytest.approx(0.29)
    # Paired by seed: the shared seeds 0, 1 only; differences -0.10, -0.06.
    d = seeds_stats.paired_difference(codi, cm)
    assert d.n_seeds == 2 and d.mean == pytest.approx(-0.08)
    half = scipy.stats.t.ppf(0.975, 1) * np.std([-0.10, -0.06], ddof=1) / np.sqrt(2)
    assert (d.lo, d.hi) == pytest.approx((-0.08 - half, -0.08 + half))
    assert not d.resolved  # 12.7 * 0.02: the interval includes 0
    r = seeds_stats.paired_difference(codi, cm, relative=True)
    assert r.mean == pytest.approx(np.mean([0.20 / 0.30 - 1, 0.22 / 0.28 - 1]))
    with pytest.raises(ValueError, match="two results"):
        seeds_stats.aggregate_seeds({0: [_row("codi", "ddim", 4, 0.2)] * 2})


def test_check_claims_resolves_only_what_the_intervals_exclude():
    cfg = presets.table1_config("default")

    def table(values_by_row):  # {(m, s, k): [v per seed]}
        per_seed = {}
        for (m, s, k), vals in values_by_row.items():
            for seed, v in enumerate(vals):
                per_seed.setdefault(seed, []).append(_row(m, s, k, v))
        return seeds_stats.aggregate_seeds(per_seed)

    rows = table({
        ("finetune", "ddim", 200): [0.250, 0.252, 0.248],
        ("finetune", "ddim", 4): [0.300, 0.310, 0.305],  # CoDi clearly better
        ("cm", "consistency", 4): [0.200, 0.205, 0.195],  # CoDi clearly worse
        ("gd", "ddim", 4): [0.250, 0.270, 0.262],  # overlaps CoDi: not resolved
        ("direct_cm", "consistency", 4): [0.280, 0.285, 0.290],
        ("codi", "ddim", 4): [0.260, 0.262, 0.258],
    })
    lines = table1_report.check_claims(rows, cfg)
    # CoDi-4 / DDIM-200 per seed: +4.0%, +4.0%, +4.0%: within 5%, and the paper's +4.1% quoted
    assert "+4.0% [" in lines[0] and ": within +5%" in lines[0], lines[0]
    assert "paper: CoDi-4 0.2656 vs LDM-SR-200 0.2551, +4.1%" in lines[0]
    by_name = {ln.split(":")[0]: ln for ln in lines}
    assert "CoDi better" in by_name["CoDi-4 vs LDM-SR (fine-tuned, DDIM)-4"]
    assert "paper LPIPS 0.2656 vs 0.3070, CoDi better" in by_name[
        "CoDi-4 vs LDM-SR (fine-tuned, DDIM)-4"]
    assert "CM better" in by_name["CoDi-4 vs CM-4"]
    assert "paper LPIPS 0.2656 vs 0.3066" in by_name["CoDi-4 vs CM-4"]
    gd = by_name["CoDi-4 vs GD-4"]
    verdict = gd.split(": ")[-1].split(" (paper")[0]
    assert verdict == "not resolved at this budget (the interval includes 0)", gd
    assert "(paper LPIPS 0.2656 vs 0.3172, CoDi better)" in gd  # the paper's order is quoted
    assert "CoDi better (not in the paper's table)" in by_name["CoDi-4 vs Direct CM-4"]
    assert "Direct CM better" not in by_name["Direct CM-4 vs CM-4"]
    assert "CM better" in by_name["Direct CM-4 vs CM-4"]
    assert not any("250 steps" in ln or "50 steps" in ln for ln in lines)

    # A gap whose interval straddles the tolerance is not resolved; one seed resolves nothing.
    rows = table({("finetune", "ddim", 200): [0.25, 0.25, 0.25],
                  ("codi", "ddim", 4): [0.255, 0.27, 0.262]})
    assert "not resolved at this budget (the interval includes +5%)" in table1_report.check_claims(
        rows, cfg)[0]
    rows = table({("finetune", "ddim", 200): [0.20, 0.21, 0.20],
                  ("codi", "ddim", 4): [0.30, 0.31, 0.30]})
    assert "NOT within +5%" in table1_report.check_claims(rows, cfg)[0]
    rows = table({("finetune", "ddim", 200): [0.25], ("codi", "ddim", 4): [0.40],
                  ("cm", "consistency", 4): [0.2]})
    lines = table1_report.check_claims(rows, cfg)
    assert all("one seed: no interval" in ln for ln in lines), lines
    assert "not checked" in table1_report.check_claims(rows[:1], cfg)[0]


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
        monkeypatch.setattr(table1, "distill_unconditional", self.distill_unconditional)
        monkeypatch.setattr(table1, "load_teacher", self.load_teacher)
        monkeypatch.setattr(table1, "conditional_model", lambda config: (None, self.apply_fn))

    @staticmethod
    def apply_fn(params, z, t, cond, rng):
        return params["w"] * z + 0.0 * cond

    def load_teacher(self, config, workdir):
        self.teacher_calls += 1
        self.teacher = {"teacher": np.zeros(())}
        return self.teacher

    def distill_unconditional(self, cfg, run_dir, teacher_params):
        """An unconditional GD round: recorded as objective "gd_uncond"."""
        self.calls.append(dict(objective="gd_uncond", run_dir=run_dir,
                               n=cfg.distill.num_grid_steps, steps=cfg.train.num_steps,
                               teacher=teacher_params, finetuned=None, initial=None,
                               seed=cfg.seed))
        params = {"unet": np.float32(len(self.calls))}
        self.returned.append(params)
        return params

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
                seed=cfg.seed,
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
    cfg.train.num_steps = 6  # GD distillation-first: 2 + 2 + 2
    workdir = str(tmp_path)
    rows = table1.run_table1(cfg, workdir)
    seed_dir = os.path.join(workdir, "seed0")

    # Training: finetune from the teacher; CM from the fine-tuned model; GD (the paper's order):
    # two unconditional rounds from the teacher, then the last student made conditional.
    objectives = [(c["objective"], c["n"], c["steps"]) for c in stub.calls]
    n = cfg.distill.num_grid_steps
    assert objectives == [
        ("finetune", n, 6),
        ("cm", n, 6),
        ("gd_uncond", 16, 2),
        ("gd_uncond", 8, 2),
        ("finetune", n, 2),
        ("pe_codi", n, 6),
        ("codi", n, 6),
        ("direct_cm", n, 6),
    ]
    ft, (cm, gd1, gd2, gd_cond) = stub.returned[0], stub.calls[1:5]
    assert cm["finetuned"] is ft and cm["initial"] is ft and cm["teacher"] is None
    assert gd1["teacher"] is stub.teacher and gd2["teacher"] is stub.returned[2]
    assert gd_cond["teacher"] is stub.returned[3] and gd_cond["initial"] is None
    assert gd_cond["finetuned"] is None
    assert [c["run_dir"] for c in stub.calls[2:5]] == [
        os.path.join(seed_dir, "gd", name) for name in
        ("uncond_round1_N16", "uncond_round2_N8", "conditional")]
    assert stub.teacher_calls == 1 and {c["seed"] for c in stub.calls} == {0}

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
    assert all(r["n_seeds"] == 1 and r["seeds"] == [0] and np.isnan(r["ci95"]) for r in rows)
    for name in ("table1.md", "table1.json", "table1_per_seed.json", "table1_quality_vs_nfe.png",
                 "table1_grid.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    with open(os.path.join(workdir, "table1.json")) as f:
        assert [_key(r) for r in json.load(f)] == [_key(r) for r in rows]
    md = open(os.path.join(workdir, "table1.md")).read()
    assert "| codi | ddim | 4 |" in md and "CM" in md
    assert "| direct_cm | consistency | 4 |" in md and "Direct CM targets: 32 DDIM steps" in md
    assert "Seeds: 1 (0)" in md and "95% Student-t interval over seeds" in md
    assert "GD order: distillation_first" in md and "| GD (guided distillation" in md
    assert "Budget per trained row and seed (the same for every row): 6 optimiser steps" in md

    # Resume: only the row whose results are missing is trained and evaluated again.
    os.remove(os.path.join(seed_dir, "codi", "eval.json"))
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
    cfg.distill.lambda_x = 2.0
    with pytest.raises(ValueError, match="different settings.*lambda_x"):
        table1.run_table1(cfg, workdir)


def test_seeds_are_run_and_reused_one_by_one(tmp_path, monkeypatch):
    stub = _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")
    cfg.table1.rows = ("bicubic", "codi", "pe_codi")
    workdir = str(tmp_path)
    rows0 = table1.run_table1(cfg, workdir)
    assert [(c["objective"], c["seed"]) for c in stub.calls] == [("codi", 0), ("pe_codi", 0)]

    # More seeds later: only the new seeds train; seed 0's rows are read back unchanged.
    stub.calls.clear()
    cfg.table1.seeds = (0, 1, 2)
    rows = table1.run_table1(cfg, workdir)
    assert [(c["objective"], c["seed"]) for c in stub.calls] == [
        ("codi", 1), ("pe_codi", 1), ("codi", 2), ("pe_codi", 2)]
    assert stub.calls[0]["run_dir"] == os.path.join(workdir, "seed1", "codi")
    assert all(r["seeds"] == [0, 1, 2] for r in rows)
    for r0, r in zip(rows0, rows, strict=True):
        assert _key(r0) == _key(r) and r["seed_values"][0] == r0["value"]
        mean, half = seeds_stats.t_interval(r["seed_values"])
        assert r["value"] == mean and (r["ci95"] == half or np.isnan(half))
    with open(os.path.join(workdir, "table1_per_seed.json")) as f:
        per_seed = json.load(f)
    assert sorted({r["seed"] for r in per_seed}) == [0, 1, 2]
    assert len(per_seed) == 3 * len(rows)
    md = open(os.path.join(workdir, "table1.md")).read()
    assert "Seeds: 3 (0, 1, 2)" in md and "± is the half-width of the 95% Student-t interval" in md
    codi_line = next(ln for ln in md.splitlines() if ln.startswith("| codi | ddim | 4 |"))
    psnr = next(r for r in rows if _key(r) == ("codi", "ddim", 4, "psnr"))
    assert f"{psnr['value']:.2f} ± {psnr['ci95']:.2f}" in codi_line

    # A finished seed is reused per seed: deleting seed 1's codi result retrains only that one.
    os.remove(os.path.join(workdir, "seed1", "codi", "eval.json"))
    stub.calls.clear()
    rows_again = table1.run_table1(cfg, workdir)
    assert [(c["objective"], c["seed"]) for c in stub.calls] == [("codi", 1)]
    assert [_key(r) for r in rows_again] == [_key(r) for r in rows]


def test_a_one_seed_layout_workdir_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")
    old_row = tmp_path / "codi"
    old_row.mkdir()
    (old_row / "eval.json").write_text(json.dumps({"rows": [], "settings": {}}))
    with pytest.raises(ValueError, match=r"one-seed layout .*\(codi/\).*move each <row>/ folder "
                       r"into seed<S>/"):
        table1.run_table1(cfg, str(tmp_path))
    assert json.loads((old_row / "eval.json").read_text())["rows"] == []  # left as it was


@pytest.mark.parametrize("order", ["distillation_first", "finetune_first"])
def test_gd_order_decides_which_model_each_round_starts_from_and_distils(
    tmp_path, monkeypatch, order
):
    stub = _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")
    cfg.table1.rows = ("gd",)
    cfg.table1.gd_order = order
    cfg.train.num_steps = 6
    table1.run_table1(cfg, str(tmp_path))
    calls, out = stub.calls, stub.returned
    row_dir = os.path.join(str(tmp_path), "seed0", "gd")
    if order == "distillation_first":
        # No fine-tuned model at all: round 1 distils the unconditional teacher, round 2 round 1's
        # student (each starting from its teacher, `unconditional_gd_job`); then the conditional
        # network is built from round 2's student and trained with the diffusion loss.
        assert [(c["objective"], c["n"], c["steps"]) for c in calls] == [
            ("gd_uncond", 16, 2), ("gd_uncond", 8, 2), ("finetune", cfg.distill.num_grid_steps, 2)]
        assert calls[0]["teacher"] is stub.teacher and calls[1]["teacher"] is out[0]
        assert calls[2]["teacher"] is out[1] and calls[2]["initial"] is None
        assert calls[2]["run_dir"] == os.path.join(row_dir, "conditional")
    else:
        # The fine-tuned model is trained first; round 1 starts from and distils it, round 2
        # starts from and distils round 1's student.
        assert [(c["objective"], c["n"], c["steps"]) for c in calls] == [
            ("finetune", cfg.distill.num_grid_steps, 6), ("gd", 16, 3), ("gd", 8, 3)]
        assert calls[1]["finetuned"] is out[0] and calls[1]["initial"] is out[0]
        assert calls[2]["finetuned"] is out[1] and calls[2]["initial"] is out[1]
        assert calls[2]["run_dir"] == os.path.join(row_dir, "round2_N8")
        assert calls[1]["teacher"] is None and stub.teacher_calls == 1
    # Rerun: every GD run is finished, so nothing trains (each run's checkpoint is reused).
    calls.clear()
    os.remove(os.path.join(row_dir, "eval.json"))
    monkeypatch.setattr(table1, "finished_params", lambda run_dir, n: {"w": jnp.float32(0.5)})
    table1.run_table1(cfg, str(tmp_path))
    assert calls == []
    # The other order's eval.json is not reused for this one.
    cfg.table1.gd_order = "finetune_first" if order == "distillation_first" else (
        "distillation_first")
    with pytest.raises(ValueError, match="gd_order"):
        table1.run_table1(cfg, str(tmp_path))


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


def test_a_row_saved_before_an_option_existed_is_reused_only_at_its_default(tmp_path):
    """eval.json written before `data.prompts` existed: reused while the option keeps its
    default (the old behaviour), refused once it is changed."""
    cfg = presets.table1_config("tiny")
    row_dir = str(tmp_path / "codi")
    codi = table1.result_settings(cfg, "codi")
    older = {k: v for k, v in codi.items() if not k.startswith("data.prompt")}
    assert len(older) == len(codi) - 2
    table1.save_row(row_dir, [], {}, older)
    assert table1.load_finished_row(row_dir, codi, "codi") == ([], {})
    with pytest.raises(ValueError, match="data.prompt_dropout: 0.0 -> 0.5"):
        table1.load_finished_row(row_dir, {**codi, "data.prompt_dropout": 0.5}, "codi")


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
    assert not os.path.exists(os.path.join(str(tmp_path), "seed0", "finetune", "eval.json"))
    assert stub.calls[0]["run_dir"] == os.path.join(str(tmp_path), "seed0", "finetune")


def test_an_unconditional_gd_round_distils_the_unet_with_the_gd_objective():
    """The Job of a distillation-first round: the unconditional U-Net, no condition in its batch,
    the GD loss against its teacher (equal to the student at the start, yet the loss is not 0:
    one student step regresses onto two teacher steps)."""
    from cdd_jax.stages.gd import unconditional_gd_job

    cfg = table1.row_config(presets.table1_config("tiny"), "gd", num_grid_steps=8, num_steps=2)
    cfg.teacher.checkpoint = ""
    job = unconditional_gd_job(cfg, teacher_params=None)
    teacher = unbox(job.init_params(jax.random.key(0)))
    leaves, tree = jax.tree.flatten(teacher)
    rs = np.random.RandomState(0)
    teacher = jax.tree.unflatten(
        tree, [x + 0.05 * rs.standard_normal(x.shape).astype(np.float32) for x in leaves])
    job = unconditional_gd_job(cfg, teacher)
    assert job.initial_params is teacher and job.finetuned_params is teacher
    assert job.target_ema is None and not job.freeze_backbone
    size = cfg.data.crop_size
    batch = {"image": jax.random.uniform(jax.random.key(1), (4, size, size, 3), minval=-1,
                                         maxval=1)}
    loss, metrics = jax.jit(job.loss_fn)(teacher, None, teacher, batch, jax.random.key(2))
    assert np.isfinite(float(loss)) and float(loss) > 0 and "d_x" in metrics
    with pytest.raises(ValueError, match="objective 'gd'"):
        unconditional_gd_job(table1.row_config(cfg, "finetune"), teacher)


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
    seed_dir = os.path.join(workdir, "seed0")
    os.remove(os.path.join(seed_dir, "codi", "eval.json"))
    rows2 = table1.run_table1(cfg, workdir)
    assert calls == []
    codi = {_key(r): r["value"] for r in rows if r["method"] == "codi"}
    codi2 = {_key(r): r["value"] for r in rows2 if r["method"] == "codi"}
    assert codi.keys() == codi2.keys()
    np.testing.assert_allclose([codi2[k] for k in codi], list(codi.values()), rtol=1e-5)

    os.remove(os.path.join(seed_dir, "pe_codi", "eval.json"))
    ckdir = os.path.join(seed_dir, "pe_codi", "checkpoints")
    import shutil

    shutil.rmtree(os.path.join(ckdir, str(cfg.train.num_steps)))  # keep the step-2 checkpoint
    table1.run_table1(cfg, workdir)
    assert calls == [os.path.join(seed_dir, "pe_codi")]
    assert os.path.isdir(os.path.join(ckdir, str(cfg.train.num_steps)))


# ----------------------------------------------------------------------------------------------
# Photo results per row (evaluate.photos): stored in eval.json, old rows evaluated from their
# checkpoints (never retrained), aggregated per split, claims on the chosen split
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [
    False,  # codi at K = 1 only: ~40 s at load 5
    pytest.param(True, marks=pytest.mark.slow),  # + GD's last run, other settings: ~85 s
])
def test_rows_without_photo_results_are_evaluated_from_their_checkpoints_not_retrained(
    tmp_path, monkeypatch, full
):
    from cdd_jax.evaluate.photos import evaluate_photos

    stub = _StubTraining(monkeypatch)
    cfg = presets.table1_config("tiny")  # photos off, as every row of before the photo evaluation
    cfg.table1.rows = ("bicubic", "gd", "codi") if full else ("bicubic", "codi")
    cfg.table1.codi_steps = (1, 4) if full else (1,)
    cfg.train.num_steps = 6  # GD distillation-first: 2 + 2 + 2
    workdir = str(tmp_path)
    rows0 = table1.run_table1(cfg, workdir)
    seed_dir = os.path.join(workdir, "seed0")
    assert json.load(open(os.path.join(seed_dir, "codi", "eval.json")))["photos"] == {}
    saved = {"w": jnp.float32(0.5)}
    loaded = []

    def finished(run_dir, n):
        loaded.append((os.path.relpath(run_dir, seed_dir), n))
        return saved

    monkeypatch.setattr(table1, "finished_params", finished)
    cfg.evaluate.photos.update(splits=("validation",), size=128)
    cfg.table1.claims_split = "validation"
    validate_config(cfg)
    stub.calls.clear()
    rows = table1.run_table1(cfg, workdir)
    final_runs = ([("gd/conditional", 2)] if full else []) + [("codi", 6)]
    assert stub.calls == []  # nothing retrained
    assert loaded == final_runs  # each row's final checkpoint
    assert [_key(r) for r in rows] == [_key(r) for r in rows0]
    assert [r["value"] for r in rows] == [r["value"] for r in rows0]  # crop rows unchanged
    codi = json.load(open(os.path.join(seed_dir, "codi", "eval.json")))["photos"]["validation"]
    assert {(r["method"], r["sampler"], r["steps"]) for r in codi["rows"]} == {
        ("codi", "ddim", k) for k in cfg.table1.codi_steps}
    assert {r["metric"] for r in codi["rows"]} == {"psnr", "psnr_y", "ssim_y"}
    assert all(r["n_images"] == 2 for r in codi["rows"])
    # The stored rows are those of the checkpoint's parameters.
    cfg_v = cfg.copy_and_resolve_references()
    direct = evaluate_photos(cfg_v, table1_eval.row_photo_methods(
        cfg_v, "codi", saved, stub.apply_fn, get_schedule(cfg.diffusion.schedule)))
    assert [r["value"] for r in direct["validation"]["rows"]] == [r["value"] for r in
                                                                  codi["rows"]]
    agg = json.load(open(os.path.join(workdir, "table1_photos_validation.json")))
    assert {r["method"] for r in agg["rows"]} == set(cfg.table1.rows)
    assert all(r["n_seeds"] == 1 for r in agg["rows"]) and len(agg["per_seed"]) == len(
        agg["rows"])
    md = open(os.path.join(workdir, "table1.md")).read()
    assert "On the validation photos (x4; bundled validation photos" in md
    assert "checked on the validation photos (for choosing settings" in md
    assert os.path.getsize(os.path.join(workdir, "table1_quality_vs_nfe_validation.png")) > 0
    # Nothing missing: nothing loaded or evaluated again.
    loaded.clear()
    table1.run_table1(cfg, workdir)
    assert loaded == [] and stub.calls == []
    if full:
        # Other photo settings: re-evaluated from the checkpoints, still not retrained.
        cfg.evaluate.photos.seed = 1
        table1.run_table1(cfg, workdir)
        assert loaded == final_runs and stub.calls == []
        # A row without eval.json (its training run finished): evaluated on crops and photos.
        os.remove(os.path.join(seed_dir, "codi", "eval.json"))
        loaded.clear()
        table1.run_table1(cfg, workdir)
        assert loaded == [("codi", 6)] and stub.calls == []
        assert "validation" in json.load(open(os.path.join(seed_dir, "codi", "eval.json")))[
            "photos"]
    # A finished row whose checkpoint is gone: an error, not a silent retraining.
    monkeypatch.setattr(table1, "finished_params", lambda run_dir, n: None)
    cfg.evaluate.photos.seed = 2
    stub.calls.clear()
    with pytest.raises(ValueError, match="cannot be evaluated without retraining"):
        table1.run_table1(cfg, workdir)
    assert stub.calls == []


def test_claims_split_must_be_evaluated():
    cfg = presets.table1_config("default")
    assert cfg.table1.claims_split == "test" and tuple(cfg.evaluate.photos.splits) == (
        "validation", "test")
    cfg.evaluate.photos.splits = ("validation",)
    with pytest.raises(ValueError, match="claims_split 'test' must be one of"):
        validate_config(cfg)
    cfg.table1.claims_split = "crops"
    validate_config(cfg)
