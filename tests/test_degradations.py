"""Tests of the Real-ESRGAN degradation: each part against its definition, the grain transform's
determinism, and config validation. Reference computations here are loop-based / per-block
and written independently of the vectorised implementation."""

from __future__ import annotations

import itertools
import math

import cv2
import grain
import numpy as np
import pytest
from scipy import fft as sfft

from cdd_jax.data import degradations as deg


def _photo(h: int = 96, w: int = 112) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100 : 100 + h, 150 : 150 + w])


def _photo_f32(h: int = 96, w: int = 112) -> np.ndarray:
    return _photo(h, w).astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("size", [7, 13, 21])
def test_kernels_sum_to_one(size):
    rng = np.random.default_rng(0)
    kernels = [
        deg.isotropic_gaussian_kernel(size, 1.3),
        deg.anisotropic_gaussian_kernel(size, 2.5, 0.4, 0.7),
        deg.generalized_gaussian_kernel(size, 2.0, 1.0, -1.1, 0.6),
        deg.plateau_kernel(size, 2.0, 1.0, 2.0, 1.7),
        deg.sinc_kernel(size, math.pi / 3),
    ]
    cfg = deg.degradation_config()
    for _ in range(20):
        kernels.append(deg.random_blur_kernel(rng, cfg, 1))
        kernels.append(deg.random_blur_kernel(rng, cfg, 2))
        kernels.append(deg.random_final_sinc_kernel(rng, cfg))
    for k in kernels:
        assert abs(k.sum() - 1.0) < 1e-12
    for k in kernels[5:]:
        assert k.shape == (21, 21)


def test_isotropic_kernels_are_symmetric():
    for k in [
        deg.isotropic_gaussian_kernel(21, 2.7),
        deg.generalized_gaussian_kernel(15, 1.5, 1.5, 0.0, 3.0),
        deg.plateau_kernel(13, 2.0, 2.0, 0.0, 1.5),
        deg.sinc_kernel(11, 2.0),
    ]:
        np.testing.assert_allclose(k, k.T, atol=1e-15)
        np.testing.assert_allclose(k, k[::-1], atol=1e-15)
        np.testing.assert_allclose(k, k[:, ::-1], atol=1e-15)
        # rotation by 90 degrees as well (the grid is square)
        np.testing.assert_allclose(k, np.rot90(k), atol=1e-15)


def test_anisotropic_gaussian_second_moments_match_rotated_covariance():
    """A wide sampled Gaussian has covariance R diag(sx^2, sy^2) R^T (x = column offset)."""
    sx, sy, theta = 3.0, 1.2, 0.5
    k = deg.anisotropic_gaussian_kernel(41, sx, sy, theta)
    ax = np.arange(41) - 20.0
    x, y = np.meshgrid(ax, ax)
    cov = np.array([[np.sum(k * x * x), np.sum(k * x * y)], [np.sum(k * x * y), np.sum(k * y * y)]])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    expected = rot @ np.diag([sx**2, sy**2]) @ rot.T
    np.testing.assert_allclose(cov, expected, atol=1e-6)
    # point symmetry holds for any rotation
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)


@pytest.mark.parametrize("size,cutoff", [(21, math.pi / 3), (21, math.pi / 2), (13, math.pi / 2)])
def test_sinc_kernel_passes_below_cutoff_and_stops_above(size, cutoff):
    n = 256
    w = np.fft.fftfreq(n) * 2 * np.pi  # radians per pixel
    radius = np.hypot(*np.meshgrid(w, w))
    response = np.abs(np.fft.fft2(deg.sinc_kernel(size, cutoff), s=(n, n)))
    passband = response[radius < 0.5 * cutoff]
    stopband = response[(radius > 1.5 * cutoff) & (radius <= np.pi)]
    assert 0.75 < passband.min() and passband.max() < 1.1
    assert stopband.max() < 0.1
    assert passband.mean() > 15 * stopband.mean()


# --------------------------------------------------------------------------- filter, resize


def _correlate_reference(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    r = kernel.shape[0] // 2
    padded = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(img.shape)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += kernel[i, j] * padded[i : i + img.shape[0], j : j + img.shape[1]]
    return out


@pytest.mark.parametrize("shape", [(40, 50), (210, 230)])  # the second takes the tiled path
def test_filter2d_is_reflect101_correlation(shape):
    rng = np.random.default_rng(1)
    img = rng.random(shape + (3,), dtype=np.float32)
    for kernel in [
        deg.anisotropic_gaussian_kernel(21, 3.0, 1.0, 0.3),
        np.pad(deg.plateau_kernel(9, 2.0, 1.0, 1.0, 1.5), 6),
        rng.random((5, 5)),
    ]:
        np.testing.assert_allclose(
            deg.filter2d(img, kernel), _correlate_reference(img, kernel), atol=2e-6
        )


def _adaptive_avg_pool_reference(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.zeros(size + img.shape[2:])
    for i in range(size[0]):
        y0, y1 = (i * h) // size[0], math.ceil((i + 1) * h / size[0])
        for j in range(size[1]):
            x0, x1 = (j * w) // size[1], math.ceil((j + 1) * w / size[1])
            out[i, j] = img[y0:y1, x0:x1].astype(np.float64).mean(axis=(0, 1))
    return out


@pytest.mark.parametrize("size", [(20, 80), (7, 9), (37, 53), (60, 21)])
def test_area_resize_is_adaptive_average_pooling(size):
    img = np.random.default_rng(2).random((37, 53, 3), dtype=np.float32)
    out = deg.resize(img, size, "area")
    assert out.dtype == np.float32 and out.shape == size + (3,)
    np.testing.assert_allclose(out, _adaptive_avg_pool_reference(img, size), atol=1e-6)


def _interp_reference(img: np.ndarray, n_out: int, axis: int, mode: str, inv_scale: float):
    """1-D torch-style interpolation (align_corners=False, clamped taps) along `axis`."""
    x = np.moveaxis(img.astype(np.float64), axis, 0)
    n_in = x.shape[0]
    out = np.zeros((n_out,) + x.shape[1:])
    for i in range(n_out):
        src = (i + 0.5) * inv_scale - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            lam = src - i0
            out[i] = (1 - lam) * x[i0] + lam * x[min(i0 + 1, n_in - 1)]
        else:  # bicubic, A = -0.75
            i0 = math.floor(src)
            t = src - i0
            a = -0.75
            weights = [
                ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
            ]
            for k, wk in zip(range(-1, 3), weights, strict=True):
                out[i] += wk * x[min(max(i0 + k, 0), n_in - 1)]
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("scale", [0.37, 0.8, 1.33])
def test_resize_with_scale_factor_matches_torch_coordinates(mode, scale):
    img = np.random.default_rng(3).random((45, 61, 3), dtype=np.float32)
    size = deg.scaled_size(img.shape[:2], scale)
    assert size == (math.floor(45 * scale), math.floor(61 * scale))
    out = deg.resize(img, size, mode, scale=scale)
    ref = _interp_reference(img, size[0], 0, mode, 1 / scale)
    ref = _interp_reference(ref, size[1], 1, mode, 1 / scale)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    # With an explicit size only, the coordinate map uses in / out per axis.
    out = deg.resize(img, (30, 17), mode)
    ref = _interp_reference(img, 30, 0, mode, 45 / 30)
    ref = _interp_reference(ref, 17, 1, mode, 61 / 17)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_antialiased_bicubic_matches_pil_inside_and_reproduces_ramps():
    from PIL import Image

    img = np.random.default_rng(9).random((128, 96, 3), dtype=np.float32)
    out = deg.resize_aa_bicubic(img, (32, 24))
    pil = np.stack(
        [
            np.asarray(Image.fromarray(img[..., c]).resize((24, 32), Image.BICUBIC))
            for c in range(3)
        ],
        axis=-1,
    )
    # PIL renormalises at the borders where MATLAB-style imresize mirrors: compare inside.
    np.testing.assert_allclose(out[3:-3, 3:-3], pil[3:-3, 3:-3], atol=1e-5)
    ramp = np.broadcast_to(np.arange(128, dtype=np.float32)[:, None, None], (128, 8, 3)) / 128
    down = deg.resize_aa_bicubic(np.ascontiguousarray(ramp), (32, 8))[2:-2, 0, 0] * 128
    np.testing.assert_allclose(down, (np.arange(2, 30) + 0.5) * 4 - 0.5, atol=1e-3)


# ------------------------------------------------------------------------------------ noise


def test_poisson_noise_is_mean_preserving_with_shot_noise_variance():
    rng = np.random.default_rng(4)
    levels = np.arange(0, 256, 16, dtype=np.float32) / 255  # 16 distinct values -> V = 16
    img = np.broadcast_to(levels[:, None, None], (16, 64, 3)).astype(np.float32)
    draws = np.stack([deg.poisson_noise(img, rng, "unique") for _ in range(400)])
    n = draws.shape[0] * 64 * 3
    mean = draws.mean(axis=(0, 2, 3))
    var = draws.var(axis=(0, 2, 3))
    expected_var = levels.astype(np.float64) / 16
    assert np.all(np.abs(mean) < 5 * np.sqrt(expected_var / n) + 1e-12)
    np.testing.assert_allclose(var[1:], expected_var[1:], rtol=0.05)
    assert var[0] == 0  # Poisson(0) is 0
    # The added noise keeps the mean of an unclipped image.
    mid = np.full((64, 64, 3), 0.5, np.float32)
    outs = np.stack([deg.add_poisson_noise(mid, rng, 1.5, vals="fixed256") for _ in range(100)])
    std_err = 1.5 * math.sqrt(0.5 / 256 / outs.size)
    assert abs(outs.mean() - 0.5) < 5 * std_err
    assert outs.std() > 0.03  # and it is noise


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
def test_gray_noise_is_identical_across_channels(kind):
    rng = np.random.default_rng(5)
    img = 0.4 + 0.2 * _photo_f32(32, 40)  # > 7 noise sigmas away from the clip bounds
    if kind == "gaussian":
        gray = deg.add_gaussian_noise(img, rng, 10.0, gray=True)
        color = deg.add_gaussian_noise(img, rng, 10.0, gray=False)
    else:
        gray = deg.add_poisson_noise(img, rng, 1.0, gray=True)
        color = deg.add_poisson_noise(img, rng, 1.0, gray=False)
    noise = gray - img
    np.testing.assert_allclose(noise[..., 0], noise[..., 1], atol=1e-6)
    np.testing.assert_allclose(noise[..., 0], noise[..., 2], atol=1e-6)
    assert np.abs(noise).max() > 0.01
    color_noise = color - img
    assert np.abs(color_noise[..., 0] - color_noise[..., 1]).max() > 0.01


# ------------------------------------------------------------------------------------- JPEG


@pytest.mark.parametrize("jpeg", [deg.jpeg_fast, deg.jpeg_diff])
def test_jpeg_error_grows_as_quality_falls(jpeg):
    img = _photo_f32(96, 112)
    errors = [float(np.mean((jpeg(img, q) - img) ** 2)) for q in (95, 80, 60, 40, 20)]
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    out = jpeg(img, 37.3)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() >= 0 and out.max() <= 1


def _diffjpeg_reference(img: np.ndarray, quality: float) -> np.ndarray:
    """Per-block float64 re-statement of DiffJPEG with scipy's orthonormal DCT-II."""
    factor = 50 / quality if quality < 50 else (200 - 2 * quality) / 100
    h, w = img.shape[:2]
    hp, wp = math.ceil(h / 16) * 16, math.ceil(w / 16) * 16
    x = np.zeros((hp, wp, 3))
    x[:h, :w] = img * 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    planes = [
        0.299 * r + 0.587 * g + 0.114 * b,
        128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
        128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
    ]
    for c in (1, 2):  # 4:2:0 by 2x2 means
        planes[c] = planes[c].reshape(hp // 2, 2, wp // 2, 2).mean(axis=(1, 3))
    tables = [deg.jpeg.LUMA_TABLE.T * factor] + [deg.jpeg.CHROMA_TABLE * factor] * 2
    out = []
    for plane, table in zip(planes, tables, strict=True):
        rec = np.empty_like(plane)
        for i in range(0, plane.shape[0], 8):
            for j in range(0, plane.shape[1], 8):
                coef = sfft.dctn(plane[i : i + 8, j : j + 8] - 128, norm="ortho")
                coef = np.round(coef / table) * table
                rec[i : i + 8, j : j + 8] = sfft.idctn(coef, norm="ortho") + 128
        out.append(rec)
    y, cb, cr = out[0], np.kron(out[1], np.ones((2, 2))), np.kron(out[2], np.ones((2, 2)))
    rgb = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        axis=-1,
    )
    return np.clip(rgb[:h, :w], 0, 255) / 255


@pytest.mark.parametrize("quality", [31.5, 50.0, 87.2])
def test_jpeg_diff_matches_blockwise_reference(quality):
    img = _photo_f32(40, 56)  # not a multiple of 16: exercises the zero padding
    out, ref = deg.jpeg_diff(img, quality), _diffjpeg_reference(img, quality)
    diff = np.abs(out - ref)
    # float32 vs float64 may flip a coefficient sitting on a rounding tie; nearly all agree.
    assert np.mean(diff > 1e-4) < 0.01
    assert diff.mean() < 2e-5


def test_jpeg_paths_agree_up_to_libjpeg_differences():
    img = _photo_f32(96, 112)
    for q in (40, 75):
        mse = np.mean((deg.jpeg_fast(img, q) - deg.jpeg_diff(img, q)) ** 2)
        assert 10 * np.log10(1 / mse) > 30  # ~34-38 dB apart per the reference measurements


# -------------------------------------------------------------------------------- transform


def _grid_check(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    levels = (x + 1) / 2 * 255
    assert np.abs(levels - np.round(levels)).max() < 1e-3


@pytest.mark.parametrize(
    "preset,jpeg_impl,degrade_size",
    [
        ("realesrgan", "fast", 48),
        ("realesrgan", "diffjpeg", 0),
        ("stablesr", "fast", 0),
        ("bicubic", "fast", 0),
    ],
)
def test_pair_shapes_range_and_grid(preset, jpeg_impl, degrade_size):
    cfg = deg.degradation_config(preset)
    cfg.jpeg_impl = jpeg_impl
    cfg.degrade_size = degrade_size
    crop = 32
    transform = deg.SRPairTransform(cfg, crop)
    rng = np.random.default_rng(6)
    for image in [_photo(70, 90), _photo(1, 1), _photo(5, 40), _photo(33, 33)[..., 0]]:
        for _ in range(3):
            out = transform.random_map({"image": image}, rng)
            assert set(out) == {"image", "lq", "cond"}
            assert out["image"].shape == (crop, crop, 3)
            assert out["lq"].shape == (crop // 4, crop // 4, 3)
            assert out["cond"].shape == (crop, crop, 3)
            for value in out.values():
                assert value.dtype == np.float32 and value.min() >= -1 and value.max() <= 1
            _grid_check(out["lq"])
            # cond is the bicubic resize of lq, clipped
            lq01 = (out["lq"] + 1) / 2
            cond = np.clip(cv2.resize(lq01, (crop, crop), interpolation=cv2.INTER_CUBIC), 0, 1)
            np.testing.assert_allclose((out["cond"] + 1) / 2, cond, atol=1e-6)


def test_gt_preparation_pads_with_reflect101_and_keeps_pixels():
    cfg = deg.degradation_config("bicubic")
    cfg.flip_prob = 0.0
    image = _photo(20, 30)
    out = deg.SRPairTransform(cfg, 32).random_map({"image": image}, np.random.default_rng(0))
    gt = np.round((out["image"] + 1) / 2 * 255).astype(np.uint8)
    # 20x30 -> padded bottom/right to 32x32 -> the only 32x32 crop starts at (0, 0)
    expected = np.pad(image, ((0, 12), (0, 2), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(gt, expected)
    # bicubic preset: lq is the antialiased x4 downsample of the GT
    lq = (out["lq"] + 1) / 2
    ref = deg.quantize(deg.resize_aa_bicubic(expected.astype(np.float32) / 255, (8, 8)))
    np.testing.assert_allclose(lq, ref, atol=1e-6)


def test_channel_shuffle_permutes_the_gt_channels_and_is_off_by_default():
    assert deg.degradation_config("realesrgan").channel_shuffle_prob == 0.0
    image = _photo(48, 48)
    plain_cfg = deg.degradation_config("bicubic")
    plain_cfg.flip_prob = 0.0
    shuffled_cfg = deg.degradation_config("bicubic")
    shuffled_cfg.flip_prob, shuffled_cfg.channel_shuffle_prob = 0.0, 1.0
    perms = set()
    for seed in range(8):
        plain = deg.SRPairTransform(plain_cfg, 32).random_map(
            {"image": image}, np.random.default_rng(seed))["image"]
        shuf = deg.SRPairTransform(shuffled_cfg, 32).random_map(
            {"image": image}, np.random.default_rng(seed))["image"]
        # the crop is drawn before the permutation, and USM works per channel, so the shuffled
        # GT is the plain GT with its channels permuted
        match = [p for p in itertools.permutations(range(3))
                 if np.allclose(shuf, plain[..., list(p)], atol=1e-6)]
        assert match, f"seed {seed}: not a channel permutation"
        perms.add(match[0])
    assert len(perms) > 1  # permutations really vary


def test_sharpened_target_is_the_usm_of_the_crop():
    cfg = deg.degradation_config("bicubic")
    cfg.flip_prob, cfg.use_sharpen = 0.0, True
    image = _photo(32, 32)
    out = deg.SRPairTransform(cfg, 32).random_map({"image": image}, np.random.default_rng(0))
    img = image.astype(np.float32) / 255
    expected = deg.usm_sharpen(img)
    np.testing.assert_allclose((out["image"] + 1) / 2, expected, atol=1e-6)
    assert np.abs(expected - img).max() > 0.01
    # definition check where the soft mask saturates: a step edge gets overshoot of 0.5 * residual
    step = np.zeros((64, 64, 3), np.float32)
    step[:, 32:] = 0.6
    sharp = deg.usm_sharpen(step)
    assert sharp[32, 31, 0] == 0.0  # clipped at 0 on the dark side
    assert sharp[32, 32, 0] > 0.6  # overshoot on the bright side


def _images(n: int = 6) -> list[dict]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % 3]
        y, x = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 80)
        out.append({"image": np.ascontiguousarray(p[y : y + 60 + i, x : x + 80 - i])})
    return out


def _dataset(seed: int = 7):
    cfg = deg.degradation_config("realesrgan")
    cfg.degrade_size = 48
    return grain.MapDataset.source(_images()).random_map(deg.SRPairTransform(cfg, 32), seed=seed)


@pytest.fixture
def absl_flags_parsed():
    """grain reads its absl flags when starting workers; parse them for this test only."""
    from absl import flags

    was_parsed = flags.FLAGS.is_parsed()
    if not was_parsed:
        flags.FLAGS.mark_as_parsed()
    yield
    if not was_parsed:
        flags.FLAGS.unparse_flags()


def test_pairs_are_identical_whatever_the_number_of_workers(absl_flags_parsed):
    ds = _dataset()
    serial = [ds[i] for i in range(len(ds))]
    it = iter(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    parallel = [{k: np.array(v) for k, v in e.items()} for e in it]  # copy out of shared memory
    it.close()
    assert len(parallel) == len(serial)
    for a, b in zip(serial, parallel, strict=True):
        for key in ("image", "lq", "cond"):
            assert a[key].tobytes() == b[key].tobytes()
    # A rerun of the same (seed, index) is byte-identical; different indices differ.
    assert _dataset()[3]["lq"].tobytes() == serial[3]["lq"].tobytes()
    lqs = [s["lq"].tobytes() for s in serial]
    assert len(set(lqs)) == len(lqs)
    assert _dataset(seed=8)[3]["lq"].tobytes() != serial[3]["lq"].tobytes()


def test_per_host_slices_after_random_map_do_not_repeat_randomness():
    ds = _dataset()
    num_hosts = 2
    hosts = [ds[h::num_hosts] for h in range(num_hosts)]
    seen = {}
    for h, part in enumerate(hosts):
        for j in range(len(part)):
            index = h + j * num_hosts
            pair = part[j]
            # each host reads exactly the global pair of its global index
            assert pair["lq"].tobytes() == ds[index]["lq"].tobytes()
            seen[pair["lq"].tobytes()] = index
    assert len(seen) == len(ds)
    # Same source on both hosts (every record identical): the degradations still differ.
    same = grain.MapDataset.source([_images(1)[0]] * 4).random_map(
        deg.SRPairTransform(deg.degradation_config("stablesr"), 32), seed=7
    )
    parts = [same[h::2] for h in range(2)]
    assert parts[0][0]["lq"].tobytes() != parts[1][0]["lq"].tobytes()


def test_transform_pickles_and_uses_only_the_given_rng():
    import pickle

    transform = deg.SRPairTransform(deg.degradation_config(), 32)
    clone = pickle.loads(pickle.dumps(transform))
    element = _images(1)[0]
    np.random.seed(0)
    a = transform.random_map(element, np.random.default_rng(11))
    np.random.seed(1)  # the global generator must not matter
    b = clone.random_map(element, np.random.default_rng(11))
    for key in a:
        assert a[key].tobytes() == b[key].tobytes()


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("noise_range", (30.0, 1.0), "noise_range: min 30.0 > max 1.0"),
        ("jpeg_range2", (95.0, 30.0), "jpeg_range2"),
        ("kernel_prob", (0.5, 0.25, 0.12, 0.03, 0.12, 0.03), "kernel_prob must be >= 0 and sum"),
        ("resize_prob2", (0.3, 0.4, 0.4), "resize_prob2"),
        ("jpeg_impl", "turbo", "degradation.jpeg_impl must be one of"),
        ("poisson_vals", "exact", "poisson_vals"),
        ("lq_down", "lanczos", "lq_down"),
        ("resize_modes", ("area", "nearest"), "resize_modes"),
        ("chain", "third_order", "chain"),
        ("gray_noise_prob", 1.5, "gray_noise_prob"),
        ("kernel_size_range", (8, 21), "kernel_size_range"),
        ("degrade_size", 50, "degrade_size=50 is not divisible"),
    ],
)
def test_bad_config_is_a_clear_error(field, value, match):
    cfg = deg.degradation_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        deg.validate_degradation_config(cfg, 256)
    with pytest.raises(ValueError):
        deg.SRPairTransform(cfg, 256)  # the transform validates too, before any worker runs


def test_bad_crop_sizes_and_presets():
    cfg = deg.degradation_config()
    deg.validate_degradation_config(cfg, 256)
    with pytest.raises(ValueError, match="crop_size=250 is not divisible by degradation.scale=4"):
        deg.validate_degradation_config(cfg, 250)
    with pytest.raises(ValueError, match="crop_size=512 is larger than the padded"):
        deg.validate_degradation_config(cfg, 512)
    cfg.degrade_size = 0  # degrade the training crop itself: any multiple of the scale works
    deg.validate_degradation_config(cfg, 512)
    with pytest.raises(ValueError, match="unknown degradation preset 'esrgan'"):
        deg.degradation_config("esrgan")
    with pytest.raises(AttributeError):
        cfg.noise_rnage = (1.0, 2.0)  # locked: a typo is an error
    for preset in ("realesrgan", "stablesr", "bicubic"):
        deg.validate_degradation_config(deg.degradation_config(preset), 256)
