"""Tests of cdd_jax.data: sources, image conversion, grain pipelines, iterator resume, TFDS."""

from __future__ import annotations

import io
import json
import logging
import os

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cdd_jax.data import (
    EVAL_IMAGES,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    BundledImages,
    ImageFolderSource,
    build_train_dataset,
    data_config,
    make_eval_set,
    make_source,
    make_train_iterator,
    pad_to_min_size,
    to_rgb_uint8,
    validate_data_config,
)
from cdd_jax.data.pipeline import derive_seed


class ListSource:
    """In-memory source of uint8 RGB images (picklable, module level)."""

    def __init__(self, images):
        self.images = [np.asarray(x, np.uint8) for x in images]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def constant_images(n, size=8):
    """Image i is constant with value 10 * (i + 1): a crop reveals which record it came from."""
    return [np.full((size, size, 3), 10 * (i + 1), np.uint8) for i in range(n)]


def small_cfg(**overrides):
    cfg = data_config()
    cfg.crop_size = 16
    cfg.batch_size = 8
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def take(dataset, n, **kwargs):
    """The first n batches; by default read in the calling thread (no prefetch threads)."""
    kwargs = {"num_workers": 0, "prefetch": 0, "read_threads": 0, **kwargs}
    it = make_train_iterator(dataset, **kwargs)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def to_uint8(x):
    return np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------- config


def test_config_validation_names_the_problem():
    validate_data_config(data_config())
    cfg = data_config()
    cfg.bach_size = 4
    with pytest.raises(ValueError, match=r"'data.bach_size'; did you mean data.batch_size"):
        validate_data_config(cfg)
    for key, value, exc in [
        ("crop_size", 0, ValueError),
        ("source", "imagenet", ValueError),
        ("num_workers", -1, ValueError),
        ("batch_size", 2.0, TypeError),
        ("shuffle", 1, TypeError),
    ]:
        cfg = ml_collections.ConfigDict({**data_config().to_dict(), key: value})
        with pytest.raises(exc, match=key):
            validate_data_config(cfg)
    with pytest.raises(ValueError, match="data.folder"):
        validate_data_config(small_cfg(source="folder"))
    with pytest.raises(ValueError, match=r"batch_size 8 is not divisible by process_count 3"):
        build_train_dataset(small_cfg(), process_index=0, process_count=3)


# ----------------------------------------------------------------------------- bundled


def _thumb(x):
    return np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR), np.float32)


def test_bundled_splits_disjoint_rgb_and_no_near_duplicates():
    train, evals = BundledImages("train"), BundledImages("eval")
    assert len(train) >= 5 and len(evals) == 2
    assert set(train.names).isdisjoint(evals.names)
    assert set(evals.names) == {"flower", "coffee"} == set(EVAL_IMAGES)
    assert set(train.names) == set(TRAIN_IMAGES)
    thumbs = {}
    for src in (train, evals):
        for i, name in enumerate(src.names):
            x = src[i]
            assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3, name
            assert min(x.shape[:2]) >= 256 and x.std() > 10, name  # real photos, not blanks
            thumbs[name] = _thumb(x)
    # Mean abs difference of 32x32 thumbnails: the stereo pair (a known near-duplicate) is close,
    # every eval image is far from every train image.
    assert np.abs(thumbs["motorcycle_left"] - thumbs["motorcycle_right"]).mean() < 30
    for e in evals.names:
        assert min(np.abs(thumbs[e] - thumbs[t]).mean() for t in train.names) > 30, e
    assert train[0] is train[0]  # cached per process
    with pytest.raises(ValueError, match="split"):
        BundledImages("val")


def test_train_validation_and_test_photos_are_disjoint_and_not_near_duplicates():
    """The three named lists (one place: cdd_jax.data.bundled) share no photo, cover every
    bundled photo, and no test photo is a near-duplicate of a training photo."""
    splits = {s: BundledImages(s) for s in ("train", "validation", "test")}
    assert splits["validation"].names == EVAL_IMAGES == VALIDATION_IMAGES
    assert splits["test"].names == TEST_IMAGES and len(TEST_IMAGES) == 6
    names = [set(src.names) for src in splits.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert names[i].isdisjoint(names[j])
    # issue 19's full-image evaluation (benchmarks/heldout_photos.py) reads the same two lists
    assert set(VALIDATION_IMAGES) == {"coffee", "flower"}
    assert set(TEST_IMAGES) == {"camera", "coins", "moon", "hubble_deep_field", "brick", "gravel"}
    train_thumbs = [_thumb(x) for x in splits["train"]]
    for i, name in enumerate(TEST_IMAGES):
        x = splits["test"][i]
        assert x.dtype == np.uint8 and x.shape[2] == 3 and min(x.shape[:2]) >= 256, name
        assert min(np.abs(_thumb(x) - t).mean() for t in train_thumbs) > 30, name


# ----------------------------------------------------------------------------- images


def test_to_rgb_uint8_conversions_against_formulas():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(grey), np.stack([grey] * 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(grey[..., None]), np.stack([grey] * 3, -1))

    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = np.array([0, 128, 255, 64, 200, 255, 1], np.uint8)[None, :].repeat(5, 0)
    want = np.round(
        rgb.astype(np.float64) * alpha[..., None] / 255 + 255.0 * (1 - alpha[..., None] / 255)
    ).astype(np.uint8)
    got = to_rgb_uint8(np.concatenate([rgb, alpha[..., None]], -1))
    assert np.abs(got.astype(int) - want).max() <= 1
    assert np.all(got[alpha == 0] == 255)  # transparent -> white
    np.testing.assert_array_equal(got[alpha == 255], rgb[alpha == 255])
    got_la = to_rgb_uint8(np.stack([grey, np.zeros_like(grey)], -1))
    assert np.all(got_la == 255)

    deep = np.array([[0, 257, 65535, 32896, 128]], np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(deep)[..., 0], [[0, 1, 255, 128, 0]])
    flt = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(to_rgb_uint8(flt)[..., 1], [[0, 0, 128, 255, 255]])
    np.testing.assert_array_equal(to_rgb_uint8(np.eye(2, dtype=bool))[..., 2], [[255, 0], [0, 255]])
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((4,), np.uint8))
    with pytest.raises(TypeError, match="int32"):
        to_rgb_uint8(np.zeros((4, 4), np.int32))


def test_pad_to_min_size_reflects_and_keeps_content():
    x = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    y = pad_to_min_size(x, 9, 10)
    assert y.shape == (9, 10, 3)
    top, left = (9 - 5) // 2, (10 - 4) // 2
    np.testing.assert_array_equal(y[top : top + 5, left : left + 4], x)
    # Reflection about the first row/column (the edge pixel is not repeated).
    np.testing.assert_array_equal(y[top - 1], y[top + 1])
    np.testing.assert_array_equal(y[:, left - 1], y[:, left + 1])
    # Pads much larger than the image still work; a 1-pixel axis is edge-padded.
    assert pad_to_min_size(x, 64, 64).shape == (64, 64, 3)
    line = np.arange(6, dtype=np.uint8).reshape(1, 6, 1).repeat(3, -1)
    z = pad_to_min_size(line, 4, 6)
    assert z.shape == (4, 6, 3) and np.all(z == line)
    assert pad_to_min_size(x, 3, 3) is x


# ----------------------------------------------------------------------------- image folders


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {}
    arrays["good.png"] = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arrays["good.png"]).save(tmp_path / "good.png")
    yy, xx = np.mgrid[0:40, 0:40]
    smooth = np.stack([yy * 6, xx * 6, (yy + xx) * 3], -1).astype(np.uint8)
    arrays["photo.jpg"] = smooth
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "sub").mkdir()
    arrays["grey.png"] = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(arrays["grey.png"]).save(tmp_path / "sub" / "grey.png")
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = np.array([0, 128, 255, 255] * 5, np.uint8)[None, :]
    arrays["rgba.png"] = rgba
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    deep = (rng.integers(0, 256, (20, 20)) * 257).astype(np.uint16)
    deep[0, :3] = [0, 65535, 32896]
    arrays["deep16.png"] = deep
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    arrays["tiny.png"] = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(arrays["tiny.png"]).save(tmp_path / "tiny.png")
    # Stored 20 wide x 10 high, EXIF orientation 6: display rotated 90 degrees clockwise.
    arrays["rotated.png"] = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arrays["rotated.png"]).save(tmp_path / "rotated.png", exif=exif)
    # Three files to skip: random bytes named .jpg, an empty .png, a text file.
    (tmp_path / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, arrays


def test_image_folder_converts_and_skips(image_folder, caplog):
    path, arrays = image_folder
    with caplog.at_level(logging.WARNING, logger="cdd_jax.data.sources"):
        src = ImageFolderSource(path)
    assert len(src) == 7 and src.num_skipped == 3
    assert {os.path.basename(f) for f, _ in src.skipped} == {
        "corrupt.jpg",
        "empty.png",
        "notes.txt",
    }
    assert any("skipped 3 file(s)" in r.getMessage() for r in caplog.records)
    images = {os.path.basename(f): src[i] for i, f in enumerate(src.files)}
    for name, x in images.items():
        assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3, name
    np.testing.assert_array_equal(images["good.png"], arrays["good.png"])
    assert np.abs(images["photo.jpg"].astype(int) - arrays["photo.jpg"]).mean() < 3
    np.testing.assert_array_equal(images["grey.png"], np.stack([arrays["grey.png"]] * 3, -1))
    rgba = arrays["rgba.png"].astype(np.float64)
    a = rgba[..., 3:] / 255
    want = np.round(rgba[..., :3] * a + 255 * (1 - a))
    assert np.abs(images["rgba.png"] - want).max() <= 1
    np.testing.assert_array_equal(
        images["deep16.png"][..., 0], np.round(arrays["deep16.png"] / 257.0).astype(np.uint8)
    )
    np.testing.assert_array_equal(images["deep16.png"][0, :3, 0], [0, 255, 128])
    np.testing.assert_array_equal(images["rotated.png"], np.rot90(arrays["rotated.png"], k=-1))


def test_truncated_jpeg_is_replaced_or_skipped(tmp_path, caplog):
    """A JPEG cut after its header passes the cheap scan; decoding it falls back to the next
    image (logged); verify="decode" skips it up front."""
    rng = np.random.default_rng(5)
    good = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "a.png")
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="JPEG")
    (tmp_path / "b.jpg").write_bytes(buf.getvalue()[: 3 * len(buf.getvalue()) // 4])
    src = ImageFolderSource(tmp_path)
    assert len(src) == 2 and src.num_skipped == 0
    with caplog.at_level(logging.WARNING, logger="cdd_jax.data.sources"):
        np.testing.assert_array_equal(src[1], good)
    assert any("b.jpg" in r.getMessage() for r in caplog.records)
    strict = ImageFolderSource(tmp_path, verify="decode")
    assert len(strict) == 1 and strict.num_skipped == 1


def test_tiny_image_is_padded_in_the_pipeline(tmp_path):
    rng = np.random.default_rng(2)
    tiny = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    cfg = small_cfg(source="folder", folder=str(tmp_path), batch_size=4)
    (batch,) = take(build_train_dataset(cfg), 1)
    assert batch["image"].shape == (4, 16, 16, 3)
    colours = {tuple(p) for p in tiny.reshape(-1, 3)}
    assert {tuple(p) for p in to_uint8(batch["image"]).reshape(-1, 3)} <= colours


def test_empty_or_bad_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        build_train_dataset(small_cfg(source="folder", folder=str(empty)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\x00" * 10)
    (bad / "y.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no readable images.*2 file\(s\) skipped"):
        make_source(small_cfg(source="folder", folder=str(bad)), "train")
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")


# ----------------------------------------------------------------------------- pipelines


def test_pretrain_crops_are_windows_of_the_image_with_flips():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    cfg = small_cfg(crop_size=8, batch_size=8)
    batches = take(build_train_dataset(cfg, source=ListSource([image])), 4)
    windows = np.lib.stride_tricks.sliding_window_view(image, (8, 8), axis=(0, 1))
    windows = windows.transpose(0, 1, 3, 4, 2)  # (17, 13, 8, 8, 3)
    flips, positions = 0, set()
    for batch in batches:
        x = batch["image"]
        assert x.shape == (8, 8, 8, 3) and x.dtype == np.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        for crop in to_uint8(x):
            match = np.argwhere(np.all(windows == crop, axis=(2, 3, 4)))
            match_flip = np.argwhere(np.all(windows == crop[:, ::-1], axis=(2, 3, 4)))
            assert len(match) + len(match_flip) >= 1
            flips += len(match) == 0
            positions.add(tuple((match if len(match) else match_flip)[0]))
    assert 6 <= flips <= 26 and len(positions) > 20
    unflipped = take(
        build_train_dataset(small_cfg(crop_size=8, random_flip=False), source=ListSource([image])),
        4,
    )
    for batch in unflipped:
        for crop in to_uint8(batch["image"]):
            assert np.all(windows == crop, axis=(2, 3, 4)).any()
    # Exact end points of the [-1, 1] scaling.
    full = take(
        build_train_dataset(
            small_cfg(crop_size=1, batch_size=1),
            source=ListSource([np.array([[[0, 255, 51]]], np.uint8)]),
        ),
        1,
    )
    np.testing.assert_array_equal(
        full[0]["image"][0, 0, 0], np.float32([-1.0, 1.0, np.float32(51) / np.float32(127.5) - 1])
    )


def test_epochs_are_permutations_of_repeated_records():
    n, epoch = 5, 20  # min_records_per_epoch=20 -> each image 4 times per epoch
    cfg = small_cfg(crop_size=4, batch_size=4, min_records_per_epoch=epoch)
    batches = take(build_train_dataset(cfg, source=ListSource(constant_images(n))), 15)
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
    ids = np.round((ids + 1) * 127.5 / 10).astype(int) - 1
    orders = ids.reshape(3, epoch)
    for order in orders:
        np.testing.assert_array_equal(np.bincount(order, minlength=n), [epoch // n] * n)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    assert not np.array_equal(orders[0], np.arange(epoch) % n)
    sequential = take(
        build_train_dataset(
            small_cfg(crop_size=4, batch_size=4, min_records_per_epoch=epoch, shuffle=False),
            source=ListSource(constant_images(n)),
        ),
        5,
    )
    seq_ids = np.concatenate([b["image"][:, 0, 0, 0] for b in sequential])
    np.testing.assert_array_equal(
        np.round((seq_ids + 1) * 12.75).astype(int) - 1, np.arange(20) % n
    )


def test_same_seed_same_batches_other_seed_differs():
    a = take(build_train_dataset(small_cfg(seed=7)), 3)
    b = take(build_train_dataset(small_cfg(seed=7)), 3)
    c = take(build_train_dataset(small_cfg(seed=8)), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert derive_seed(7, 0) != derive_seed(7, 1) != derive_seed(8, 1)
    # Threads only change speed, never the batches.
    d = take(build_train_dataset(small_cfg(seed=7)), 3, read_threads=2, prefetch=4)
    for x, y in zip(a, d, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_single_process_stream(process_count):
    """Process p's batch k == rows [p * B / P, (p + 1) * B / P) of the single-process batch k.

    So the processes' batches are disjoint (different stream records, different random crops)
    and, concatenated in process order as the global array is built, are exactly the
    single-process batch row for row (the train step's per-row noise then pairs with the same
    images); no record is skipped or repeated.
    """
    single = take(build_train_dataset(small_cfg()), 3)
    local = [
        take(build_train_dataset(small_cfg(), process_index=p, process_count=process_count), 3)
        for p in range(process_count)
    ]
    for k in range(3):
        for p in range(process_count):
            assert local[p][k]["image"].shape == (8 // process_count, 16, 16, 3)
        rows = np.concatenate([local[p][k]["image"] for p in range(process_count)])
        np.testing.assert_array_equal(rows, single[k]["image"])
        assert len({r.tobytes() for r in rows}) == 8  # no two processes share a crop
    # The stream does not depend on the batch size either.
    halves = take(build_train_dataset(small_cfg(batch_size=4)), 2)
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), single[0]["image"])


def _resume_check(num_workers):
    cfg = small_cfg(batch_size=4)
    it = make_train_iterator(build_train_dataset(cfg), num_workers=num_workers, prefetch=2)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["image"].copy() for _ in range(3)]
    it.close()
    fresh = make_train_iterator(build_train_dataset(cfg), num_workers=num_workers, prefetch=2)
    fresh.set_state(state)
    got = [next(fresh)["image"].copy() for _ in range(3)]
    fresh.close()
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)
    return expected


def test_resume_from_iterator_state_is_exact():
    expected = _resume_check(num_workers=0)
    uninterrupted = take(build_train_dataset(small_cfg(batch_size=4)), 8)
    for x, y in zip(expected, uninterrupted[5:], strict=True):
        np.testing.assert_array_equal(x, y["image"])


@pytest.mark.multiprocess
def test_resume_with_worker_processes_is_exact():
    """Two grain worker processes (~20 s: each worker re-imports the stack)."""
    expected = _resume_check(num_workers=2)
    in_process = take(build_train_dataset(small_cfg(batch_size=4)), 8)
    for x, y in zip(expected, in_process[5:], strict=True):  # workers do not change the batches
        np.testing.assert_array_equal(x, y["image"])


class FakeSRTransform(grain.transforms.RandomMap):
    """Stand-in for degradations.SRPairTransform: crop, 4x box-downsample, nearest upsample."""

    def __init__(self, crop_size):
        self.crop_size = crop_size

    def random_map(self, element, rng):
        x = element["image"]
        c = self.crop_size
        top = rng.integers(0, x.shape[0] - c + 1)
        left = rng.integers(0, x.shape[1] - c + 1)
        gt = x[top : top + c, left : left + c].astype(np.float32) / 127.5 - 1
        lq = gt.reshape(c // 4, 4, c // 4, 4, 3).mean(axis=(1, 3))
        return {"image": gt, "lq": lq, "cond": lq.repeat(4, 0).repeat(4, 1)}


def test_sr_task_applies_the_given_transform():
    cfg = small_cfg()
    batches = take(build_train_dataset(cfg, task="sr", sr_transform=FakeSRTransform(16)), 2)
    again = take(build_train_dataset(cfg, task="sr", sr_transform=FakeSRTransform(16)), 2)
    for b, b2 in zip(batches, again, strict=True):
        assert b["image"].shape == (8, 16, 16, 3) and b["lq"].shape == (8, 4, 4, 3)
        assert b["cond"].shape == (8, 16, 16, 3)
        for k in b:
            np.testing.assert_array_equal(b[k], b2[k])
    with pytest.raises(ValueError, match="sr_transform"):
        build_train_dataset(cfg, task="sr")
    with pytest.raises(ValueError, match="sr_transform"):
        build_train_dataset(cfg, sr_transform=FakeSRTransform(16))
    with pytest.raises(ValueError, match="task"):
        build_train_dataset(cfg, task="denoise")
    ev = make_eval_set(cfg, task="sr", sr_transform=FakeSRTransform(16), num_crops=5, seed=1)
    assert set(ev) == {"image", "lq", "cond"} and ev["lq"].shape == (5, 4, 4, 3)


def test_channel_shuffle_is_training_only_and_leaves_eval_crops_unchanged():
    from cdd_jax.data.degradations import SRPairTransform, degradation_config

    cfg = small_cfg()
    plain = degradation_config("bicubic")
    shuffled = degradation_config("bicubic")
    shuffled.channel_shuffle_prob = 1.0
    ev_plain = make_eval_set(cfg, task="sr", sr_transform=SRPairTransform(plain, 16), num_crops=6)
    ev_shuf = make_eval_set(cfg, task="sr", sr_transform=SRPairTransform(shuffled, 16),
                            num_crops=6)
    for k in ev_plain:
        np.testing.assert_array_equal(ev_plain[k], ev_shuf[k])
    tr_plain = take(build_train_dataset(cfg, task="sr", sr_transform=SRPairTransform(plain, 16)), 1)
    tr_shuf = take(build_train_dataset(cfg, task="sr", sr_transform=SRPairTransform(shuffled, 16)),
                   1)
    assert not np.array_equal(tr_plain[0]["image"], tr_shuf[0]["image"])


def test_eval_set_is_fixed_and_cycles_the_eval_images():
    cfg = small_cfg(num_eval_crops=6)
    a, b = make_eval_set(cfg), make_eval_set(cfg)
    assert a["image"].shape == (6, 16, 16, 3) and a["image"].dtype == np.float32
    np.testing.assert_array_equal(a["image"], b["image"])
    c = make_eval_set(cfg, seed=cfg.eval_seed + 1)
    assert not np.array_equal(a["image"], c["image"])
    # Crop i comes from eval image i mod N.
    src = ListSource(constant_images(3, size=20))
    ev = make_eval_set(cfg, num_crops=7, seed=0, source=src)
    ids = np.round((ev["image"][:, 0, 0, 0] + 1) * 12.75).astype(int) - 1
    np.testing.assert_array_equal(ids, np.arange(7) % 3)
    # Eval crops come from the held-out photos, not from training ones.
    flower, coffee = (BundledImages("eval")[i] for i in range(2))
    first = to_uint8(a["image"][0])
    windows = np.lib.stride_tricks.sliding_window_view(flower[..., 0], (16, 16))
    assert np.all(windows == first[..., 0], axis=(2, 3)).any()
    assert coffee.shape != flower.shape


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    from cdd_jax.data.tfds_local import LocalImages

    root = tmp_path_factory.mktemp("tfds")
    images = root / "images"
    rng = np.random.default_rng(4)
    originals = {}
    for split, count in (("train", 4), ("validation", 2)):
        (images / split).mkdir(parents=True)
        for i in range(count):
            x = rng.integers(0, 256, (18 + i, 24, 3), dtype=np.uint8)
            if i == 1:  # a greyscale file: stored as RGB by the builder
                x = x[..., 0]
            Image.fromarray(x).save(images / split / f"{i}.png")
            originals[(split, i)] = to_rgb_uint8(x)
        (images / split / "junk.txt").write_text("skip me")
    builder = LocalImages(image_dir=images, data_dir=root / "data")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return root / "data", originals


def test_tfds_source_reads_locally_built_array_record(tfds_dir):
    from cdd_jax.data.sources import TfdsImageSource

    data_dir, originals = tfds_dir
    for split, count in (("train", 4), ("validation", 2)):
        src = TfdsImageSource("local_images", split, data_dir=data_dir)
        assert len(src) == count and src.image_key == "image"
        got = sorted((src[i] for i in range(count)), key=lambda x: x.shape[0])
        want = [originals[(split, i)] for i in range(count)]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    cfg = small_cfg(source="tfds", tfds_name="local_images", tfds_data_dir=str(data_dir))
    (batch,) = take(build_train_dataset(cfg), 1)
    assert batch["image"].shape == (8, 16, 16, 3)
    assert make_eval_set(cfg, num_crops=3)["image"].shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match=r"'filename'.*not an Image"):
        TfdsImageSource("local_images", "train", data_dir=data_dir, image_key="filename")
    with pytest.raises(ValueError, match=r"'nope' is not a feature.*image"):
        TfdsImageSource("local_images", "train", data_dir=data_dir, image_key="nope")


def test_tfds_dataset_without_image_is_rejected(tmp_path):
    import tensorflow_datasets as tfds
    from etils import epath

    from cdd_jax.data.sources import TfdsImageSource

    with tfds.core.registered.skip_registration():

        class VectorsNoImage(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            code_path = epath.Path(__file__)
            pkg_dir_path = epath.Path(__file__).parent

            def _info(self):
                return self.dataset_info_from_configs(
                    features=tfds.features.FeaturesDict(
                        {
                            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                            "label": tfds.features.ClassLabel(num_classes=3),
                        }
                    )
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(3):
                    yield i, {"x": np.full(2, i, np.float32), "label": i}

        VectorsNoImage(data_dir=tmp_path).download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    # Read back from the files alone (the builder class is not registered).
    with pytest.raises(ValueError, match=r"no Image feature; features: \{") as err:
        TfdsImageSource("vectors_no_image", "train", data_dir=tmp_path)
    assert "'x': 'Tensor'" in str(err.value) and "'label': 'ClassLabel'" in str(err.value)
    with pytest.raises(ValueError, match="nonexistent_dataset_xyz.*not found") as err:
        TfdsImageSource("nonexistent_dataset_xyz", "train", data_dir=tmp_path)
    assert len(str(err.value)) < 300  # not TFDS's list of every registered dataset
