"""The benchmark scripts' own arithmetic (the timings themselves are measured, not tested)."""

from __future__ import annotations

import json

import pytest

from benchmarks.profile_step import op_category, per_step_categories


def test_op_categories_strip_numeric_suffixes_only():
    assert op_category("ynn_fusion.319") == "ynn_fusion"
    assert op_category("add_divide_fusion.7") == "add_divide_fusion"
    assert op_category("copy") == "copy"
    assert op_category("transpose_copy_fusion.18 (thunk)") == "transpose_copy_fusion"


def test_profile_sums_xla_ops_per_step_and_drops_host_events():
    events = [
        {"ph": "X", "name": "ynn_fusion.1", "dur": 3000},  # microseconds
        {"ph": "X", "name": "ynn_fusion.2", "dur": 1000},
        {"ph": "X", "name": "copy.5", "dur": 500},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},  # host bookkeeping
        {"ph": "X", "name": "$common.py:93 time_calls", "dur": 9e6},  # Python frame
        {"ph": "i", "name": "ynn_fusion.3", "dur": 7000},  # not a complete event
    ]
    cats = per_step_categories(events, steps=2)
    assert list(cats) == ["ynn_fusion", "copy"]  # most time first
    assert cats["ynn_fusion"]["ms"] == pytest.approx(2.0)  # 4 ms over 2 steps
    assert cats["ynn_fusion"]["count"] == pytest.approx(1.0)
    assert cats["copy"]["ms"] == pytest.approx(0.25)


def test_paired_summary_averages_seeds_per_crop_and_calls_ties():
    import numpy as np

    from benchmarks.sr_paired import paired_summary

    # 2 seeds x 4 crops; seed-averaged per-crop differences are 1, 1, 1, 1 -> stderr 0 -> "yes"
    d = np.array([[0.5, 1.5, 1.0, 2.0], [1.5, 0.5, 1.0, 0.0]])
    s = paired_summary(d, higher_is_better=True)
    assert s["mean"] == pytest.approx(1.0) and s["stderr"] == pytest.approx(0.0)
    assert s["per_seed_means"] == pytest.approx([1.25, 0.75])
    assert s["beats_bicubic"] == "yes" and s["win_fraction"] == 1.0
    # lower is better (LPIPS): the same positive differences are a loss
    assert paired_summary(d, higher_is_better=False)["beats_bicubic"] == "no"
    # mean 0.25, per-crop std 1.5 over 4 crops -> stderr 0.75 > mean / 2 -> tie
    t = paired_summary(np.array([[1.75, -1.25, 1.75, -1.25]]), higher_is_better=True)
    assert t["mean"] == pytest.approx(0.25)
    assert t["stderr"] == pytest.approx(np.std([1.75, -1.25, 1.75, -1.25], ddof=1) / 2)
    assert t["beats_bicubic"] == "tie" and t["win_fraction"] == 0.5


class _FakeWorker:
    def __init__(self, name, **info):
        self.name, self.info = name, info


def test_credited_flops_prefer_xla_unless_the_peer_counts_more():
    from benchmarks.train_step import credited_flops

    # On a CPU XLA's cost analysis counts the convolutions (and the element-wise work): it wins.
    mine = _FakeWorker("cdd_jax", flops_per_step=81.5e9)
    peer = _FakeWorker("peer", layer_flops_per_step=80.0e9)
    assert credited_flops([mine, peer]) == (81.5e9, "XLA cost analysis")
    # XLA:GPU leaves cuDNN convolutions out of its count (3.5 vs 85.6 GFLOP measured on an H100):
    # the peer's convolution/matmul count, a lower bound of the same work, is credited instead.
    gpu = _FakeWorker("cdd_jax", flops_per_step=3.5e9)
    flops, source = credited_flops([gpu, _FakeWorker("peer", layer_flops_per_step=85.6e9)])
    assert flops == 85.6e9 and source.startswith("torch FlopCounterMode")
    # A backend that reports no cost (nan) falls back to the peer's count too; no peer: XLA's.
    nan = _FakeWorker("cdd_jax", flops_per_step=float("nan"))
    assert credited_flops([nan, peer])[0] == 80.0e9
    assert credited_flops([mine]) == (81.5e9, "XLA cost analysis")


def test_benchmark_configs_take_the_shared_batch_and_dtype_overrides():
    from benchmarks.contenders import make_config

    base = make_config("codi", "default")
    cfg = make_config("codi", "default", 256, dtype="bfloat16")
    assert cfg.data.batch_size == 256 and cfg.model.dtype == "bfloat16"
    assert base.data.batch_size == 32 and base.model.dtype == "float32"
    assert make_config("pretrain", "large", None).data.batch_size == 16  # the variant's own


def test_layer_alternatives_compute_the_frameworks_layers():
    """The candidates timed by benchmarks/layer_alternatives.py are the same functions: im2col conv
    == XLA's conv, hand-written GroupNorm VJP == flax GroupNorm differentiated by JAX (values and
    gradients), on shapes with several groups per channel block and uneven statistics."""
    import jax.numpy as jnp

    from benchmarks import layer_alternatives as la

    fns, args = la.conv_case((2, 6, 3, 5))
    assert la.max_rel_err(fns["xla"](*args), fns["im2col"](*args)) < 1e-5
    x, w = args
    assert la.max_rel_err(la.conv_xla(x, w), la.conv_im2col(x, w)) < 1e-5
    fns, args = la.gn_case((2, 4, 5, 8), groups=4)
    assert la.max_rel_err(fns["flax"](*args), fns["hand_vjp"](*args)) < 1e-5
    x, s, b = args
    y = la.group_norm_hand_vjp(x, s, b, 4)
    assert la.max_rel_err(la.group_norm_flax(x, s, b, 4), y) < 1e-5
    # And the normalisation itself: per (example, group), zero mean and unit variance before the
    # affine map.
    xhat = ((y - b) / s).reshape(2, 20, 4, 2)
    assert jnp.allclose(jnp.mean(xhat, axis=(1, 3)), 0.0, atol=1e-5)
    assert jnp.allclose(jnp.var(xhat, axis=(1, 3)), 1.0, atol=1e-4)


def _kernels(tree) -> list[tuple[int, int]]:
    """(in, out) channels of the conv kernels of a flax params tree, in name order."""
    import flax.linen as nn
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
    return [tuple(v.shape[-2:]) for k, v in leaves if jax.tree_util.keystr(k).endswith("kernel']")]


@pytest.mark.parametrize("latent_factor", [1, 8])
def test_sd_peer_condition_embedder_is_the_ports(latent_factor):
    """The peer's condition embedder (benchmarks/peer_torch.cond_embedder_convs) has the convs of
    cdd_jax's CondEmbedder: the same (in, out) channels in order and the strides that take the
    full-resolution condition to the latent resolution, as the port computes it."""
    import jax
    import jax.numpy as jnp

    from benchmarks.peer_torch import cond_embedder_convs
    from cdd_jax.models.control import CondEmbedder

    hidden, width, size = (16, 32, 96, 256), 32, 64
    n_down = latent_factor.bit_length() - 1
    module = CondEmbedder(width, hidden, num_downsample=n_down)
    cond = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.eval_shape(jax.random.key, 0), cond)["params"]
    out = jax.eval_shape(module.apply, {"params": params}, cond)
    convs = cond_embedder_convs(hidden, width, 3, n_down)
    assert [(a, b) for a, b, _ in convs] == _kernels(params)
    stride = 1
    for _, _, s in convs:
        stride *= s
    assert stride == latent_factor and out.shape == (1, size // stride, size // stride, width)
    assert [s for *_, s in convs][-1] == 1  # conv_out keeps the latent resolution
    with pytest.raises(ValueError, match="cannot downsample"):
        cond_embedder_convs((16,), width, 3, 2)


def test_sd_benchmark_config_is_sd15s_block_structure_resolved_against_its_folder(tmp_path):
    """The "sd" kind's teacher folder and config: the port reads the U-Net config the benchmark
    writes; "sd15" is SD 1.5's U-Net (859,520,964 parameters, as published) and "sd_small" has its
    block structure; the SD recipe resolved against the folder trains on 32 px latents of 256 px
    images, cross-attending to a [1, 77, 64] prompt embedding; "sd15" is skipped without a GPU."""
    import jax

    from benchmarks import contenders as bc
    from cdd_jax.convert.diffusers import abstract_params
    from cdd_jax.convert.sd import load_prompt_embeds, read_subfolder_config
    from cdd_jax.models.diffusers.unet_2d_condition import DEFAULTS, UNet2DConditionModel

    sd15_module = UNet2DConditionModel.from_config(bc.sd_unet_config("sd15"))
    sd15 = sd15_module.config
    sd15_published = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                          cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                          in_channels=4, out_channels=4, sample_size=64)
    assert {k: sd15[k] for k in sd15_published} == sd15_published
    assert sum(x.size for x in jax.tree.leaves(abstract_params(sd15_module))) == 859_520_964
    small = UNet2DConditionModel.from_config(bc.sd_unet_config("sd_small")).config
    for cfg in (sd15, small):  # cross-attention at every level but the deepest, mirrored going up
        levels = len(cfg["block_out_channels"])
        assert list(cfg["down_block_types"]) == (["CrossAttnDownBlock2D"] * (levels - 1)
                                                 + ["DownBlock2D"])
        assert list(cfg["up_block_types"]) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
        assert cfg["mid_block_type"] == DEFAULTS["mid_block_type"] == "UNetMidBlock2DCrossAttn"
        assert cfg["use_linear_projection"] is False and cfg["act_fn"] == "silu"

    config = bc.sd_bench_config("sd_small", teacher_root=str(tmp_path))
    folder = config.teacher.checkpoint
    assert folder.startswith(str(tmp_path))
    assert read_subfolder_config(folder, "unet")["block_out_channels"] == [32, 64]
    m = config.model
    assert (m.family, m.latent_factor, m.latent_channels, m.prompt_tokens, m.prompt_embed_dim) == (
        "unet2d_condition", 8, 4, 77, 64)
    assert config.data.crop_size // m.latent_factor == small["sample_size"] == 32
    assert load_prompt_embeds(folder).shape == (1, 77, 64)
    assert (config.diffusion.prediction_type, config.diffusion.schedule) == ("epsilon",
                                                                             "scaled_linear")
    assert tuple(config.control.cond_embed_ch) == (16, 32, 96, 256)  # ControlNet's
    assert (config.distill.lambda_x, config.control.anchor_precision) == (1.0, 0.0)
    assert bc.sd_bench_config("sd_small", teacher_root=str(tmp_path)).teacher.checkpoint == folder
    assert "GPU" in bc.gpu_only_reason("sd15", None)
    assert bc.gpu_only_reason("sd15", "NVIDIA H100 80GB HBM3") is None
    assert bc.gpu_only_reason("sd_small", None) is None
    with pytest.raises(ValueError, match="unknown sd variant"):
        bc.sd_bench_config("sd21")


def _write_run(path, values):
    """A per-image CSV like the jobs' photos_<split>_per_image.csv: {(sampler, K, metric): [v]}."""
    lines = ["image,method,sampler,steps,metric,value"]
    for (sampler, k, metric), vals in values.items():
        lines += [f"crop{i},codi,{sampler},{k},{metric},{v!r}" for i, v in enumerate(vals)]
    path.write_text("\n".join(lines) + "\n")


def test_ablation_report_pairs_by_crop_and_applies_the_rule(tmp_path):
    """benchmarks/ablate_default_report.py: differences are paired by crop (a shift common to
    every crop has zero spread), the interval is the t-interval of the per-crop differences, and
    a deviation is kept exactly when removing it raises the exported sampler's mean LPIPS."""
    from benchmarks.ablate_default_report import compare, read_per_image

    base_lp = [0.50, 0.40, 0.60, 0.45]
    rows = [("fresh-uniform", 4), ("ddim-uniform", 4), ("ddim-uniform", 1)]

    def run(lpips_shift, psnr):
        v = {}
        for s, k in rows:
            v[(s, k, "lpips_alex")] = [x + lpips_shift + (0.02 if s == "ddim-uniform" else 0)
                                       for x in base_lp]
            v[(s, k, "psnr_y")] = psnr
            v[(s, k, "ssim_y")] = [0.5] * 4
        return v

    _write_run(tmp_path / "base.per_image.csv", run(0.0, [20.0, 21.0, 22.0, 23.0]))
    _write_run(tmp_path / "no_anchor.per_image.csv", run(0.03, [20.0, 21.0, 22.0, 23.0]))
    _write_run(tmp_path / "lambda1.per_image.csv", run(-0.01, [21.0, 21.0, 21.0, 25.0]))
    runs = {n: read_per_image(str(tmp_path / f"{n}.per_image.csv"))
            for n in ("base", "no_anchor", "lambda1")}
    res = compare(runs, "base")
    assert res["ablations"]["no_anchor"]["keep"] is True
    assert res["ablations"]["lambda1"]["keep"] is False
    lp = next(r for r in res["ablations"]["no_anchor"]["rows"]
              if r["sampler"] == "fresh-uniform" and r["metric"] == "lpips_alex")
    assert lp["diff"] == pytest.approx(0.03) and lp["half_width"] == pytest.approx(0.0, abs=1e-12)
    ps = next(r for r in res["ablations"]["lambda1"]["rows"]
              if r["sampler"] == "fresh-uniform" and r["metric"] == "psnr_y")
    d = [1.0, 0.0, -1.0, 2.0]  # per-crop differences; sd = sqrt(5/3), t(0.975, 3) = 3.182446
    assert ps["diff"] == pytest.approx(0.5)
    assert ps["half_width"] == pytest.approx(3.182446 * (5 / 3) ** 0.5 / 2, rel=1e-5)
    assert sum(d) / 4 == ps["diff"]
    assert res["sampler"]["lpips_alex"]["diff"] == pytest.approx(0.02)  # ddim - fresh
    assert res["sampler"]["keep_fresh"] is True
    runs["bad"] = {k: dict(list(v.items())[:3]) for k, v in runs["lambda1"].items()}
    with pytest.raises(ValueError, match="different images"):
        compare({"base": runs["base"], "no_anchor": runs["bad"]}, "base")


def test_sr_default_test_pairs_every_student_row_with_bicubic(tmp_path):
    """benchmarks/sr_default_test.py: each student row minus bicubic, crop by crop, for every
    metric; bicubic itself is not a row."""
    from benchmarks.ablate_default_report import read_per_image
    from benchmarks.sr_default_test import against_bicubic

    lines = ["image,method,sampler,steps,metric,value"]
    bic = {"lpips_alex": [0.7, 0.8, 0.6], "psnr_y": [22.0, 20.0, 24.0], "ssim_y": [0.5] * 3}
    stu = {"lpips_alex": [0.5, 0.7, 0.5], "psnr_y": [23.0, 20.0, 24.5], "ssim_y": [0.6] * 3}
    for m in bic:
        lines += [f"c{i},bicubic,none,0,{m},{v!r}" for i, v in enumerate(bic[m])]
        lines += [f"c{i},codi,fresh-uniform,4,{m},{v!r}" for i, v in enumerate(stu[m])]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    rows = against_bicubic(read_per_image(str(tmp_path / "p.csv")))
    assert {(r["sampler"], r["steps"]) for r in rows} == {("fresh-uniform", 4)}
    by = {r["metric"]: r for r in rows}
    assert by["lpips_alex"]["diff"] == pytest.approx(-0.4 / 3)
    assert by["psnr_y"]["diff"] == pytest.approx(0.5)
    assert by["psnr_y"]["bicubic"] == pytest.approx(22.0)
    assert by["ssim_y"]["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert by["ssim_y"]["n_images"] == 3


def test_results_doc_quotes_the_stored_table1_report():
    """docs/RESULTS.md's marked tables are the stored report's (benchmarks/table1_doc.py): a
    re-run whose numbers were not carried into the doc fails here."""
    from benchmarks.table1_doc import main

    assert main(["--check"]) == 0


def test_table1_doc_replaces_marked_blocks_only():
    from benchmarks.table1_doc import render

    report = "\n".join([
        "# Table 1", "", "| a | b |", "|---|---|", "| crop | 1.0 |", "",
        "Seeds: 3 (0, 1, 2), each ...", "",
        "On the validation photos (x4):", "", "| a | b |", "|---|---|", "| val | 2.0 |", "",
        "On the test photos (x4):", "", "| a | b |", "|---|---|", "| test | 3.0 |", "",
        "The paper's claims on this run (seed means):", "- claim one", "- claim two", "",
        "Paper Table 1 (...):", "", "| p | q |", "|---|---|", "| CoDi | 0.2656 |", ""])
    doc = ("intro 9.9\n<!-- table1:test -->\n| old | 0.0 |\n<!-- /table1:test -->\nmiddle\n"
           "<!-- table1:claims -->\n<!-- /table1:claims -->\n")
    out = render(doc, report)
    assert out == ("intro 9.9\n<!-- table1:test -->\n| a | b |\n|---|---|\n| test | 3.0 |\n"
                   "<!-- /table1:test -->\nmiddle\n<!-- table1:claims -->\n- claim one\n"
                   "- claim two\n<!-- /table1:claims -->\n")
    assert render(out, report) == out
    with pytest.raises(ValueError, match="unknown blocks"):
        render("<!-- table1:tset -->\n<!-- /table1:tset -->\n", report)


def _budget_row(seed_dir, row, steps, values):
    """A Table 1 row's eval.json holding test-photo values {(method, sampler, k): {m: [..]}}."""
    per_image = [{"image": f"p{i}", "method": key[0], "sampler": key[1], "steps": key[2],
                  "metric": m, "value": v}
                 for key, metrics in values.items() for m, vals in metrics.items()
                 for i, v in enumerate(vals)]
    d = seed_dir / row
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"rows": [], "settings": {"train.num_steps": steps},
                                             "photos": {"test": {"per_image": per_image}}}))


def test_table1_budget_pairs_by_photo_and_flags_order_changes(tmp_path):
    """benchmarks/table1_budget.py: each row's change with the budget is paired by photo, and a
    CoDi-vs-fine-tuned comparison is flagged exactly when the sign of its mean flips (LPIPS lower
    is better, Y-PSNR higher)."""
    from benchmarks.table1_budget import CODI, OTHERS, compare, read_seed

    flat = {"ssim_y": [0.5, 0.5, 0.5]}

    def rows(codi_lp, ft_lp, codi_psnr):
        ft = {k: {"lpips_alex": ft_lp, "psnr_y": [20.0, 21.0, 22.0], **flat} for k in OTHERS}
        co = {k: {"lpips_alex": codi_lp, "psnr_y": codi_psnr, **flat} for k in CODI}
        return ft, co

    for name, steps, (ft, co) in (
        ("short", 500, rows([0.7, 0.8, 0.9], [0.6, 0.7, 0.8], [21.0, 22.0, 23.0])),
        ("long", 1000, rows([0.5, 0.7, 0.6], [0.6, 0.7, 0.8], [21.0, 22.0, 23.0])),
    ):
        _budget_row(tmp_path / name / "seed1", "finetune", steps, ft)
        _budget_row(tmp_path / name / "seed1", "codi", steps, co)
    short, s_steps = read_seed(str(tmp_path / "short" / "seed1"), "test")
    long, l_steps = read_seed(str(tmp_path / "long" / "seed1"), "test")
    assert (s_steps, l_steps) == (500, 1000)
    res = compare(short, long)
    change = next(r for r in res["changes"] if r["row"] == "CoDi-4" and r["metric"] == "lpips_alex")
    assert change["diff"] == pytest.approx(-0.2) and change["short"] == pytest.approx(0.8)
    # per-photo changes -0.2, -0.1, -0.3: sd 0.1, t(0.975, 2) = 4.302653
    assert change["half_width"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    lp = [r for r in res["versus"] if r["metric"] == "lpips_alex"]
    assert lp and all(r["order_changed"] and not r["codi_better_short"] and r["codi_better_long"]
                      for r in lp)  # +0.1 behind -> -0.1 ahead
    ps = [r for r in res["versus"] if r["metric"] == "psnr_y"]
    assert all(r["codi_better_short"] and not r["order_changed"] for r in ps)  # +1 dB both times
    (tmp_path / "long" / "seed1" / "codi" / "eval.json").write_text(json.dumps(
        {"settings": {"train.num_steps": 1000}, "photos": {}}))
    with pytest.raises(ValueError, match="no 'test' photo results"):
        read_seed(str(tmp_path / "long" / "seed1"), "test")
