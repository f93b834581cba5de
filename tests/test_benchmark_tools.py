"""The benchmark scripts' own arithmetic (the timings themselves are measured, not tested)."""

from __future__ import annotations

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
