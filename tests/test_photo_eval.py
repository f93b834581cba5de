"""Tests for the jobs' photo evaluation (`cdd_jax.evaluate.photos`, issue 21): the photo sets
of the named splits, and the sr job's photo rows against `python -m cdd_jax.evaluate`'s on the
same images and seed (the same tiled path, so the same values). Table 1's use of it (photo
results per row, evaluated from checkpoints for old rows) is tested in tests/test_table1.py."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_student import tiny_student_params

from cdd_jax.data.bundled import TEST_IMAGES, TRAIN_IMAGES, VALIDATION_IMAGES
from cdd_jax.diffusion import get_schedule
from cdd_jax.evaluate.photos import crop_origins, photo_set, tile_settings
from cdd_jax.evaluate.protocol import image_metrics
from cdd_jax.evaluate.tiling import make_grid
from cdd_jax.stages.distill import conditional_model


def test_crop_origins_are_centred_evenly_spaced_and_on_the_scale_grid():
    assert crop_origins(400, 600, 128, 1, 4) == [(136, 236)]  # (400-128)/2, (600-128)/2
    four = crop_origins(427, 640, 128, 2, 4)
    assert len(set(four)) == 4 and all(y % 4 == 0 and x % 4 == 0 for y, x in four)
    assert all(0 <= y <= 427 - 128 and 0 <= x <= 640 - 128 for y, x in four)
    with pytest.raises(ValueError, match="does not fit"):
        crop_origins(100, 600, 128, 1, 4)


def test_photo_sets_are_the_named_splits_with_a_seeded_degradation(tmp_path):
    from cdd_jax.config.presets import sr_config
    from cdd_jax.data.bundled import load_raw_photo
    from cdd_jax.inference.evaluate import image_pairs, load_pair

    cfg = sr_config()  # realesrgan degradation, 128 px centre crops
    pcfg = cfg.evaluate.photos
    assert tuple(pcfg.splits) == ("validation", "test") and pcfg.size == 128
    val = photo_set("validation", pcfg, cfg.degradation)
    test = photo_set("test", pcfg, cfg.degradation)
    assert [p.name.split("_y")[0] for p in val] == sorted(VALIDATION_IMAGES)  # the command's order
    assert [p.name.split("_y")[0] for p in test] == sorted(TEST_IMAGES)
    assert not ({p.name.split("_y")[0] for p in val + test} & set(TRAIN_IMAGES))
    for p in val + test:
        assert p.hr.shape == (128, 128, 3) and p.lr.shape == (32, 32, 3)
        assert p.hr.dtype == p.lr.dtype == np.uint8
    again = photo_set("validation", pcfg, cfg.degradation)
    assert all(np.array_equal(a.lr, b.lr) for a, b in zip(val, again, strict=True))
    pcfg.seed = 1
    other = photo_set("validation", pcfg, cfg.degradation)
    assert not np.array_equal(other[0].lr, val[0].lr)
    # Whole photos: cropped to a multiple of the scale, nothing else.
    pcfg.size = 0
    whole = photo_set("validation", pcfg, cfg.degradation)
    assert whole[0].hr.shape == (400, 600, 3) and whole[0].lr.shape == (100, 150, 3)  # coffee
    # ... and the inputs `python -m cdd_jax.evaluate` makes from a folder of the same photos.
    for name in VALIDATION_IMAGES:
        Image.fromarray(load_raw_photo(name)).save(tmp_path / f"{name}.png")
    for index, (name, hr_path, _) in enumerate(image_pairs(str(tmp_path), None)):
        hr, lr = load_pair(hr_path, None, 4, cfg.degradation, pcfg.seed, index)
        assert whole[index].name == name
        assert np.array_equal(whole[index].hr, hr) and np.array_equal(whole[index].lr, lr)
    # Tiles as the Upscaler resolves them; 0 = all tiles of one crop per network call.
    assert tile_settings(cfg.evaluate.photos, 32, 4) == {"tile": 32, "overlap": 8,
                                                          "tile_batch": 16}
    pcfg.size = 128
    assert tile_settings(pcfg, 32, 4)["tile_batch"] == len(make_grid(128, 128, 32, 8, align=4))


def test_image_metrics_take_several_lpips_networks():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-9, 10, hr.shape), 0, 255).astype(np.uint8)

    class Fake:  # an LPIPS stand-in: its name and the mean absolute difference
        def __init__(self, net):
            self.net = net

        def __call__(self, a, b):
            return np.abs(a - b).mean(axis=(1, 2, 3))

    one = image_metrics(sr, hr, 4, Fake("alex"))
    both = image_metrics(sr, hr, 4, [Fake("alex"), Fake("vgg")])
    assert both["lpips_alex"] == both["lpips_vgg"] == one["lpips_alex"] > 0
    assert set(image_metrics(sr, hr, 4)) == {"psnr", "psnr_y", "ssim_y"}


@pytest.mark.parametrize("steps,renoise,whole_job", [
    ((1,), ("ddim",), False),  # the photo part of `evaluate_sr` alone: ~30-40 s at load 4-5
    pytest.param((1, 2), ("ddim", "fresh"), True, marks=pytest.mark.slow),  # ~150 s at load 5
])
def test_sr_job_photo_rows_equal_the_evaluate_command_on_the_same_images(tmp_path, steps,
                                                                         renoise, whole_job):
    """The sr job's photo evaluation of a student and `evaluate_folder` (the command) on the same
    crops, degradation seed and noise seed give the same per-image values. `whole_job`: through
    `evaluate_sr` (crop evaluation, files); else the two calls it makes for the photos."""
    from cdd_jax.evaluate.photos import evaluate_photos, write_photo_files
    from cdd_jax.evaluate.sr import evaluate_sr, student_photo_methods, student_plan
    from cdd_jax.inference.evaluate import evaluate_folder
    from cdd_jax.inference.student import save_student
    from cdd_jax.inference.upscaler import Upscaler

    config, params = tiny_student_params()
    config.evaluate.student_steps = steps
    config.evaluate.renoise = renoise
    config.evaluate.photos.update(splits=("validation",), size=128, seed=3)
    _, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    out = tmp_path / "eval"
    if whole_job:
        rng = np.random.default_rng(0)
        hq = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
        eval_set = {"image": hq, "cond": hq, "lq": hq[:, ::4, ::4]}
        evaluate_sr(config, str(tmp_path), apply_fn, params, schedule, eval_set)
        assert os.path.exists(out / "results.json")  # the crop results stay
    else:
        result = evaluate_photos(config, student_photo_methods(config, apply_fn, params,
                                                               schedule))
        write_photo_files(str(out), "validation", result["validation"], "test")
    for suffix in (".json", ".md", "_per_image.csv"):
        assert (out / f"photos_validation{suffix}").stat().st_size > 0
    job = json.load(open(out / "photos_validation.json"))
    assert "(3, image index)" in job["protocol"] and "tiles of 16 px" in job["protocol"]
    methods = {(r["method"], r["sampler"], r["steps"]) for r in job["rows"]}
    assert methods == {("bicubic", "none", 0)} | {
        ("codi", f"{r}-uniform", k) for _, k, r in student_plan(config.evaluate)}
    per_image = list(csv.DictReader(open(out / "photos_validation_per_image.csv")))
    assert len({r["image"] for r in per_image}) == 2

    # The same crops as files, named so that the command's image index is the job's.
    photos = photo_set("validation", config.evaluate.photos, config.degradation)
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for i, p in enumerate(photos):
        Image.fromarray(p.hr).save(hr_dir / f"{i:02d}_{p.name}.png")
    student = str(tmp_path / "student")
    save_student(student, jax.tree.map(np.asarray, params), config)
    tiles = tile_settings(config.evaluate.photos, config.data.crop_size, 4)
    compared = 0
    for r_noise in renoise:
        ks = tuple(k for _, k, r in student_plan(config.evaluate) if r == r_noise)
        up = Upscaler.load(student, tile=tiles["tile"], overlap=tiles["overlap"],
                           tile_batch=tiles["tile_batch"], renoise=r_noise)
        evaluate_folder(up, str(hr_dir), str(tmp_path / r_noise), steps=ks, seed=3,
                        lpips_net=None)
        for r in csv.DictReader(open(tmp_path / r_noise / "per_image.csv")):
            index = int(r["image"][:2])
            method = "bicubic" if r["method"] == "bicubic" else "codi"
            sampler = "none" if method == "bicubic" else f"{r_noise}-uniform"
            match = [j for j in per_image if j["image"] == photos[index].name
                     and (j["method"], j["sampler"], j["steps"], j["metric"])
                     == (method, sampler, r["steps"], r["metric"])]
            assert len(match) == 1, r
            assert float(match[0]["value"]) == float(r["value"]), (r, match[0])
            compared += 1
    assert compared == 2 * 3 * (len(renoise) + len(student_plan(config.evaluate)))


def test_photo_settings_are_validated():
    from cdd_jax.config.presets import sd_config, sr_config
    from cdd_jax.config.validate import validate_config

    cfg = sr_config("tiny")
    assert tuple(cfg.evaluate.photos.splits) == ()  # the tiny preset evaluates no photos
    cfg.evaluate.photos.splits = ("validation", "test")
    validate_config(cfg)
    for key, value, message in (("size", 100, "at least 128"), ("size", 130, "multiple of"),
                                ("splits", ("train",), "splits"), ("crop_grid", 0, "crop_grid"),
                                ("tile", 160, "smaller than one tile")):
        bad = cfg.copy_and_resolve_references()
        bad.evaluate.photos[key] = value
        with pytest.raises(ValueError, match=message):
            validate_config(bad)
    latent = sd_config("tiny")
    latent.evaluate.photos.splits = ("test",)
    with pytest.raises(ValueError, match="pixel-space students only"):
        validate_config(latent)
