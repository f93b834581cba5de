"""Tests for the full-image evaluation (`python -m cdd_jax.evaluate`): the protocol's metrics
against scikit-image, and a run over a folder (degraded and paired) with a tiny student."""

import json

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image
from tiny_student import tiny_student_params

from cdd_jax.inference.student import save_student
from cdd_jax.inference.upscaler import Upscaler


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("student") / "student")
    config, params = tiny_student_params()
    save_student(path, params, config)
    return Upscaler.load(path, tile_batch=8)


def test_y_psnr_and_ssim_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    from skimage.color import rgb2ycbcr

    from cdd_jax.evaluate.protocol import psnr, ssim_y, y_channel

    rng = np.random.default_rng(0)
    hr = skimage.data.astronaut()[:64, :80]
    sr = np.clip(hr + rng.normal(0, 6, hr.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(y_channel(hr), rgb2ycbcr(hr)[..., 0], atol=1e-9)
    ya, yb = rgb2ycbcr(sr)[4:-4, 4:-4, 0], rgb2ycbcr(hr)[4:-4, 4:-4, 0]
    expected = skm.peak_signal_noise_ratio(yb, ya, data_range=255)
    assert abs(psnr(y_channel(sr), y_channel(hr), 4) - expected) < 1e-6
    expected = skm.structural_similarity(ya, yb, data_range=255, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
    assert abs(ssim_y(sr, hr, 4) - expected) < 1e-9


def test_evaluate_command_on_a_folder(upscaler, tmp_path):
    from cdd_jax.inference.evaluate import evaluate_folder

    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    photo = skimage.data.astronaut()
    for i, (y, x) in enumerate([(100, 180), (300, 60)]):
        Image.fromarray(photo[y:y + 42, x:x + 49]).save(hr_dir / f"im{i}.png")  # 40x48 used.
        Image.fromarray(cv2.resize(photo[y:y + 40, x:x + 48], (12, 10),
                                   interpolation=cv2.INTER_AREA)).save(lr_dir / f"im{i}.png")
    rows = evaluate_folder(upscaler, str(hr_dir), str(tmp_path / "a"), steps=(1,),
                           lpips_net="alex")
    keys = {(r["method"], r["steps"], r["metric"]) for r in rows}
    assert keys == {(m, k, x) for m, k in (("bicubic", 0), ("student", 1))
                    for x in ("psnr", "psnr_y", "ssim_y", "lpips_alex")}
    assert all(r["n"] == 2 and np.isfinite(r["stderr"]) for r in rows)
    summary = json.load(open(tmp_path / "a" / "summary.json"))
    assert "realesrgan" not in summary["protocol"] and "bicubic" in summary["protocol"]
    assert len(open(tmp_path / "a" / "per_image.csv").read().splitlines()) == 1 + 2 * 2 * 4
    assert "| student | 1 |" in open(tmp_path / "a" / "summary.md").read()
    paired = evaluate_folder(upscaler, str(hr_dir), str(tmp_path / "b"), lr_dir=str(lr_dir),
                             steps=(1,), lpips_net=None)
    bicubic_y = [r["value"] for r in paired if r["method"] == "bicubic" and r["metric"] ==
                 "psnr_y"]
    assert bicubic_y[0] > 20
    Image.fromarray(photo[:11, :12]).save(lr_dir / "im1.png")
    with pytest.raises(ValueError, match="paired folders must be aligned"):
        evaluate_folder(upscaler, str(hr_dir), str(tmp_path / "c"), lr_dir=str(lr_dir),
                        steps=(1,), lpips_net=None)
