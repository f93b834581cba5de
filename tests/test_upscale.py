"""Tests for exported students, the tiled upscaler and `python -m cdd_jax.upscale`: the folder's
round trip and corruption errors, the saved-config reader, tiling invariance and seams, exactness
of one tile, real-image modes (grey, alpha, 16 bits, EXIF) and every bad input."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
from tiny_student import tiny_student_params

from cdd_jax.config.presets import sr_config
from cdd_jax.config.saved import saved_config
from cdd_jax.distill.sampling import few_step_sample
from cdd_jax.evaluate.tiling import (
    Blender,
    condition_rows,
    make_grid,
    noise_tiles,
    reflect_index,
    seam_ratio,
)
from cdd_jax.inference.student import Student, StudentFolderError, load_student, save_student
from cdd_jax.inference.upscaler import Upscaler
from cdd_jax.train.student_folder import student_info
from cdd_jax.upscale import upscale_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny student (the configs/sr.py:tiny network, random parameters) saved as a folder."""
    path = str(tmp_path_factory.mktemp("student") / "student")
    config, params = tiny_student_params()
    save_student(path, params, config, metrics=[{"psnr": 1.0}])
    return path


@pytest.fixture(scope="module")
def upscaler(student_dir):
    return Upscaler.load(student_dir, tile_batch=8)


@pytest.fixture(scope="module")
def photo():
    """A 24x20 natural RGB image (astronaut, area-downsampled): output 96x80, several tiles."""
    return cv2.resize(skimage.data.astronaut()[40:280, 120:320], (20, 24),
                      interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------- student folder
def test_saved_config_restores_the_run_config_and_fills_new_keys():
    config = sr_config("tiny")
    assert saved_config(config.to_dict()).to_dict() == config.to_dict()
    old = json.loads(json.dumps(config.to_dict()))
    old["adapter"] = old.pop("control")  # A run saved before the rename ...
    del old["adapter"]["anchor_factor"]  # ... and an option added since.
    restored = saved_config(old)
    assert restored.control.anchor_factor == 4  # Today's default.
    assert restored.control.cond_embed_ch == (8,)  # The saved value, a tuple again.
    assert restored.degradation.preset == "bicubic"


def test_load_round_trip_gives_identical_outputs(student_dir, photo):
    loaded = load_student(student_dir)
    assert loaded.scale == 4 and loaded.crop_size == 16 and loaded.info["metrics"] == [
        {"psnr": 1.0}]
    assert loaded.info["provenance"]["versions"]["jax"] == jax.__version__
    assert os.stat(student_dir).st_mode & 0o777 == 0o777 & ~_umask()  # Not mkdtemp's 0700.
    _, params = tiny_student_params()  # The saved parameters, made again (not read back).
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    same = Student(loaded.config, jax.tree.map(jnp.asarray, params), loaded.apply_fn,
                   loaded.schedule, loaded.info, "")
    a = Upscaler(same, tile_batch=8)(photo, steps=2, seed=3)
    b = Upscaler.load(student_dir, tile_batch=8)(photo, steps=2, seed=3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["flip_params", "drop_config", "garble_manifest"])
def test_corrupted_student_folder_is_an_error_naming_the_file(student_dir, tmp_path, damage):
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(student_dir, path)
    if damage == "flip_params":
        name = "params.safetensors"
        data = bytearray(open(os.path.join(path, name), "rb").read())
        data[-7] ^= 1  # One bit of one parameter.
        open(os.path.join(path, name), "wb").write(bytes(data))
    elif damage == "drop_config":
        name = "config.json"
        os.remove(os.path.join(path, name))
    else:
        name = "manifest.json"
        open(os.path.join(path, name), "w").write("{not json")
    with pytest.raises(StudentFolderError, match=name):
        load_student(path)


def test_missing_shipped_student_is_a_clear_error(monkeypatch, tmp_path):
    import cdd_jax.inference.student as student_mod

    monkeypatch.setattr(student_mod, "SHIPPED", str(tmp_path / "absent"))
    with pytest.raises(StudentFolderError, match="no shipped student"):
        load_student()


def test_student_info_reads_the_sampler_from_the_config():
    info = student_info(sr_config("tiny"))
    assert info["scale"] == 4 and info["sampler"]["default_renoise"] == "ddim"
    assert info["sampler"]["default_steps"] == 4


# ---------------------------------------------------------------------------- tiling
def test_grid_covers_the_image_and_weights_sum_to_one():
    grid = make_grid(50, 37, 16, 4, align=4, offset=(8, 4))
    (top, bottom), (left, right) = grid.pads
    assert min(top, bottom, left, right) >= 0
    wsum = np.zeros(grid.canvas_shape)
    for i, (y, x) in enumerate(grid.origins()):
        wsum[y:y + 16, x:x + 16] += grid.weights(i)
    np.testing.assert_allclose(wsum, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        make_grid(50, 37, 18, 4, align=4)


def test_reflect_index_is_numpy_reflect_padding():
    for n in (1, 2, 3, 7):
        wide = np.arange(-4 * n - 3, 5 * n + 4)
        padded = np.pad(np.arange(n), (4 * n + 3, 4 * n + 4), mode="reflect")
        np.testing.assert_array_equal(reflect_index(wide, n), padded)


@pytest.mark.parametrize("h, w, tile, overlap, offset", [
    (1, 1, 16, 4, (0, 0)), (9, 13, 16, 4, (8, 4)), (37, 5, 32, 8, (0, 12)), (6, 30, 8, 0, (4, 0)),
])
def test_condition_bands_equal_the_whole_padded_condition(h, w, tile, overlap, offset):
    """Each row of tiles' condition, made from a few input rows, equals the rows of the whole
    image upsampled, clipped, scaled and reflect-padded (bit for bit; values outside [0, 1] in
    the input exercise the clip)."""
    lr = np.random.default_rng(h * w).random((h, w, 3), dtype=np.float32) * 1.2 - 0.1
    grid = make_grid(4 * h, 4 * w, tile, overlap, align=4, offset=offset)
    whole = cv2.resize(lr, (4 * w, 4 * h), interpolation=cv2.INTER_CUBIC).reshape(4 * h, 4 * w, 3)
    scaled = np.clip(whole, 0, 1) * np.float32(2) - np.float32(1)
    canvas = np.pad(scaled, (*grid.pads, (0, 0)), mode="reflect")
    for r in range(grid.ny):
        y = r * grid.stride
        np.testing.assert_array_equal(condition_rows(lr, grid, y, 4), canvas[y:y + tile])


def test_row_by_row_blending_equals_blending_the_whole_canvas():
    """Random tiles blended by `Blender` (a band of one row of tiles) against the whole-canvas
    weighted sum divided by the summed weight, computed here in the same order: identical."""
    grid = make_grid(70, 45, 16, 4, align=4, offset=(4, 8))
    rng = np.random.default_rng(0)
    values = rng.standard_normal((len(grid), 16, 16, 2)).astype(np.float32)
    acc = np.zeros((*grid.canvas_shape, 2), np.float32)
    wsum = np.zeros(grid.canvas_shape, np.float32)
    blender, out = Blender(grid, 2), np.full((70, 45, 2), np.nan, np.float32)
    for i, (y, x) in enumerate(grid.origins()):
        acc[y:y + 16, x:x + 16] += grid.weights(i)[..., None] * values[i]
        wsum[y:y + 16, x:x + 16] += grid.weights(i)
        if i > 0 and i % grid.nx == 0:
            y0, rows = blender.finish_row()
            out[y0:y0 + len(rows)] = rows
        blender.add(i, (y, x), values[i])
    y0, rows = blender.finish_row()
    out[y0:y0 + len(rows)] = rows
    (top, _), (left, _) = grid.pads
    ref = (acc / wsum[..., None])[top:top + 70, left:left + 45]
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="grid's order"):
        Blender(grid, 2).add(grid.nx, grid.origins()[grid.nx], values[0])


def test_noise_is_one_field_whatever_the_tile():
    key = jax.random.key(5)
    whole = np.asarray(noise_tiles(key, np.array([[-20, -7]]), 64, 3))[0]
    parts = np.asarray(noise_tiles(key, np.array([[-20, -7], [3, 30], [-4, 1]]), 24, 3))
    np.testing.assert_array_equal(parts[0], whole[:24, :24])
    np.testing.assert_array_equal(parts[1], whole[23:47, 37:61])
    np.testing.assert_array_equal(parts[2], whole[16:40, 8:32])
    assert abs(whole.std() - 1) < 0.05 and abs(whole.mean()) < 0.05


def test_one_tile_equals_the_untiled_network_exactly(upscaler):
    """A 4x4 input -> 16x16 output = one 16 px tile: the blended result is the sampler's."""
    student = upscaler.student
    up = Upscaler(student, tile=16, overlap=4, tile_batch=1)
    rgb = np.asarray(skimage.data.astronaut()[100:104, 200:204], np.float32) / 255.0
    cond = np.clip(cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_CUBIC), 0, 1) * 2 - 1
    key = jax.random.key(11)
    for steps, renoise in [(1, "ddim"), (2, "fresh")]:
        reference = jax.jit(lambda p, c, s=steps, r=renoise: few_step_sample(
            student.apply_fn, p, c, key, schedule=student.schedule, num_steps=s,
            grid=student.config.evaluate.grid, renoise=r,
            noise=lambda i: noise_tiles(jax.random.fold_in(key, i), np.zeros((1, 2), int), 16,
                                        3)))(student.params, cond[None])
        expected = np.clip((np.asarray(reference[0]) + 1) / 2, 0, 1)
        got = up.upscale_rgb(rgb, steps=steps, seed=11, renoise=renoise)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_shifted_tile_grids_agree_and_show_no_seams(upscaler, photo, steps):
    """Two grids shifted by half a tile: their mean difference is under half of what another
    noise seed changes (measured with this random network: 0.35x at K = 1, 0.32x at K = 4;
    noise that moved with the tiles would make it ~1x), and the gradient energy along tile
    borders is not above the rest (measured 0.95). The metric itself sees an 8/255 step
    between tiles."""
    rgb = photo.astype(np.float32) / 255.0
    a = upscaler.upscale_rgb(rgb, steps=steps, seed=0, renoise="fresh")
    b = upscaler.upscale_rgb(rgb, steps=steps, seed=0, renoise="fresh", offset=(8, 8))
    other_seed = upscaler.upscale_rgb(rgb, steps=steps, seed=1, renoise="fresh")
    shift_diff = np.abs(a - b).mean()
    seed_diff = np.abs(a - other_seed).mean()
    h, w = a.shape[:2]
    grid = make_grid(h, w, upscaler.tile, upscaler.overlap, align=4)
    ratio = seam_ratio(a, grid)
    print(f"K={steps}: grid shift {shift_diff:.4f}, seed change {seed_diff:.4f}, "
          f"seam ratio {ratio:.3f}")
    assert shift_diff < 0.5 * seed_diff
    assert ratio < 1.1
    smooth = cv2.GaussianBlur(a, (0, 0), 2.0)
    (top, _), (left, _) = grid.pads
    rows = (np.arange(h)[:, None] + top) // grid.stride
    cols = (np.arange(w)[None, :] + left) // grid.stride
    stepped = smooth + ((rows + cols) % 2)[..., None] * (8 / 255)  # Tiles 8 levels apart.
    print(f"metric: smooth {seam_ratio(smooth, grid):.3f}, stepped "
          f"{seam_ratio(stepped, grid):.3f}")
    assert seam_ratio(smooth, grid) < 1.1 < seam_ratio(stepped, grid)


# ---------------------------------------------------------------------------- real inputs
def test_array_layouts_and_depths_are_kept(upscaler, photo):
    grey = photo.mean(axis=2).astype(np.uint8)
    alpha = np.linspace(0, 255, grey.size).reshape(grey.shape).astype(np.uint8)
    out = upscaler(grey, steps=1)
    assert out.shape == (96, 80) and out.dtype == np.uint8
    for image in (np.dstack([photo, alpha]), np.dstack([grey, alpha])):
        out = upscaler(image, steps=1)
        assert out.shape == (96, 80, image.shape[2]) and out.dtype == np.uint8
        expected = cv2.resize(alpha.astype(np.float32) / 255, (80, 96),
                              interpolation=cv2.INTER_CUBIC)
        np.testing.assert_array_equal(out[..., -1], np.round(np.clip(expected, 0, 1) * 255))
    out8 = upscaler(photo, steps=1)
    out16 = upscaler(photo.astype(np.uint16) * 257, steps=1)
    assert out16.dtype == np.uint16 and out16.shape == (96, 80, 3)
    assert np.abs(out16 / 257.0 - out8).max() <= 1.0
    with pytest.raises(ValueError, match="zero-sized"):
        upscaler(np.zeros((0, 5, 3), np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                              0, 0))
            + chunk(b"IEND", b""))


def test_image_files_of_every_format_and_mode(upscaler, photo, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    grey = photo.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([photo, np.full(grey.shape, 128, np.uint8)])
    for name in ("rgb.jpg", "rgb_w.webp", "rgb_b.bmp", "rgb_t.tif"):
        Image.fromarray(photo).save(src / name)
    Image.fromarray(grey).save(src / "grey.png")
    Image.fromarray(rgba).save(src / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(src / "grey16.png")
    cv2.imwrite(str(src / "rgb16.png"), (photo.astype(np.uint16) * 257)[..., ::-1])
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotated: displayed 90 degrees clockwise.
    Image.fromarray(photo).save(src / "rotated.jpg", exif=exif)
    summary = upscale_files([str(src)], str(out), upscaler, steps=1, err=io.StringIO())
    assert not summary.failed and len(summary.done) == 9
    modes = {n: Image.open(out / n) for n in os.listdir(out)}
    assert sorted(modes) == sorted(["rgb.png", "rgb_w.png", "rgb_b.png", "rgb_t.png", "grey.png",
                                    "rgba.png", "grey16.png", "rgb16.png", "rotated.png"])
    assert {n: im.mode for n, im in modes.items() if not n.startswith("rgb")} == {
        "grey.png": "L", "grey16.png": "I;16", "rotated.png": "RGB"}
    assert modes["rgba.png"].mode == "RGBA" and modes["rgb.png"].size == (80, 96)
    assert modes["rotated.png"].size == (96, 80)  # EXIF orientation applied before upscaling.
    rgb16 = cv2.imread(str(out / "rgb16.png"), cv2.IMREAD_UNCHANGED)
    assert rgb16.dtype == np.uint16 and rgb16.shape == (96, 80, 3)
    kept = upscale_files([str(src / "rgb.jpg")], str(tmp_path / "kept"), upscaler, steps=1,
                         keep_format=True)
    assert kept.done[0][1].endswith("rgb.jpg") and Image.open(kept.done[0][1]).format == "JPEG"


def test_bad_inputs_are_one_line_errors_and_the_rest_is_written(upscaler, photo, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    small = photo[:12, :16]
    Image.fromarray(small).save(src / "a_good.png")
    Image.fromarray(small).save(src / "b_good.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)).save(
        buf, format="PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    (src / "empty.png").write_bytes(b"")
    (src / "zero.png").write_bytes(_png_header_only(0, 0))
    (src / "text.png").write_bytes(b"not an image at all")
    Image.fromarray(photo).save(src / "big.png")  # 24 x 20 = 480 pixels > 400.
    Image.fromarray(small).save(out / "same.png")
    same_bytes = (out / "same.png").read_bytes()
    err = io.StringIO()
    summary = upscale_files([str(src), str(tmp_path / "missing.png"), str(out / "same.png")],
                            str(out), upscaler, steps=1, max_pixels=400, err=err)
    lines = err.getvalue().splitlines()
    expected = {"truncated.png": "truncated", "empty.png": "empty file", "zero.png": "zero-sized",
                "text.png": "not an image", "big.png": "over the limit",
                "missing.png": "no such file", "same.png": "is this input file"}
    assert len(lines) == len(expected) == len(summary.failed)
    for name, reason in expected.items():
        hits = [line for line in lines if f"{name}: " in line]
        assert len(hits) == 1 and reason in hits[0], (name, lines)
    assert sorted(os.listdir(out)) == ["a_good.png", "b_good.png", "same.png"]  # No temp files.
    assert Image.open(out / "a_good.png").size == (64, 48)
    assert os.stat(out / "a_good.png").st_mode & 0o777 == 0o666 & ~_umask()  # Not 0600.
    assert (out / "same.png").read_bytes() == same_bytes


def test_command_line_exit_code_counts_the_failures(student_dir, photo, tmp_path):
    Image.fromarray(photo[:8, :8]).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cdd_jax.upscale", str(tmp_path / "good.png"),
         str(tmp_path / "bad.png"), f"--output={tmp_path / 'out'}", f"--model={student_dir}",
         "--steps=1", "--noprogress"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert f"error: {tmp_path / 'bad.png'}: empty file" in proc.stderr
    assert "upscaled 1 of 2 images" in proc.stdout
    assert os.listdir(tmp_path / "out") == ["good.png"]


def test_heldout_check_reports_numbers_that_differ_from_the_recorded_ones(tmp_path):
    """A folder that records one made-up row ({"psnr": 1.0}): the re-evaluation on the job's
    held-out crops cannot reproduce it, and says so (the identical case: the slow test below, on
    a student the job really evaluated). One sampler, PSNR only, to keep it fast."""
    from cdd_jax.inference.reproduce import reproduce_job_evaluation

    config, params = tiny_student_params()
    config.evaluate.update(student_steps=(1,), renoise=("ddim",), metrics=("psnr",))
    config.data.num_eval_crops = 4
    save_student(str(tmp_path / "student"), params, config, metrics=[{"psnr": 1.0}])
    report = reproduce_job_evaluation(load_student(str(tmp_path / "student")),
                                      str(tmp_path / "again"))
    assert not report["identical"] and report["rows"] > 1
    assert report["differences"][0][0] == {"psnr": 1.0}
    assert (tmp_path / "again" / "eval" / "results.json").is_file()


# ---------------------------------------------------------------------------- the sr job
@pytest.mark.slow
def test_sr_job_exports_a_student_that_reproduces_its_evaluation(tmp_path):
    """The tiny sr job writes <workdir>/student; the student loaded from it alone (no workdir)
    gives the job's own evaluation rows exactly, and upscales."""
    import cdd_jax
    from cdd_jax.evaluate.sr import evaluate_sr
    from cdd_jax.stages.sr import make_sr_eval_set

    rows = cdd_jax.train_and_evaluate(sr_config("tiny"), str(tmp_path / "run"))
    folder = str(tmp_path / "copy")
    os.rename(tmp_path / "run" / "student", folder)
    student = load_student(folder)
    assert student.info["metrics"] == json.loads(json.dumps(rows))
    again = evaluate_sr(student.config, str(tmp_path / "again"), student.apply_fn,
                        student.params, student.schedule, make_sr_eval_set(student.config))
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "sec" not in k}
                        for r in rs]
    assert strip(again) == strip(rows)
    # The same check from the command line, on the folder alone.
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "cdd_jax.evaluate", "--heldout",
                           f"--model={folder}", f"--out={tmp_path / 'cli'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"identical: all {len(rows)} metric rows" in proc.stdout
    out = Upscaler(student)(np.zeros((5, 7, 3), np.uint8), steps=1)
    assert out.shape == (20, 28, 3)
