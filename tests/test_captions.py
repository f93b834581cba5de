"""Per-example prompts from captioned image folders (cdd_jax.data.captions): each crop arrives
with its own image's embedding, dropout replaces it by the empty prompt's at the configured rate
without changing the crops, and stale or mismatched embedding files are named before any
compile. (Encoding captions with a real CLIP text encoder: tests/test_prompt_encoding.py, peers.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cdd_jax.config.presets import sd_config
from cdd_jax.config.validate import validate_config
from cdd_jax.data.captions import (
    EMBEDS_FILE,
    CaptionedFolderSource,
    check_caption_shapes,
    read_captions,
    write_prompt_embeds,
)
from cdd_jax.data.config import data_config
from cdd_jax.data.degradations import SRPairTransform, degradation_config
from cdd_jax.data.pipeline import build_train_dataset, make_eval_set, make_source
from cdd_jax.data.sources import ImageFolderSource

T, D = 3, 4
GREYS = (20, 90, 160, 230)  # image i is one grey level: recognisable after crop, flip, shuffle


def _folder(root, captions=("a red car", "", "a red car", "two cats")):
    """Four constant-grey images in `root` (one in a sub-folder), captions as sidecars ("" =
    none), and the embedding file: image i's embedding is i + 1 everywhere, the empty one 0."""
    os.makedirs(root / "sub", exist_ok=True)
    names = ["a.png", "b.png", "sub/c.png", "d.png"]
    for grey, name, cap in zip(GREYS, names, captions, strict=True):
        Image.fromarray(np.full((40, 48, 3), grey, np.uint8)).save(root / name)
        if cap:
            (root / name).with_suffix(".txt").write_text(cap + "\n")
    embeds = {name: np.full((T, D), i + 1.0, np.float32) for i, name in enumerate(names)}
    write_prompt_embeds(root, embeds, np.zeros((1, T, D), np.float32), source="test")
    return names


def _cfg(folder, **kw):
    c = data_config()
    c.update(source="folder", folder=str(folder), eval_folder=str(folder), crop_size=16,
             batch_size=4, prompts="captions", min_records_per_epoch=8, **kw)
    return c


def _grey_index(crops):
    """Index into GREYS of each constant crop (float in [-1, 1])."""
    levels = (np.asarray(GREYS, np.float32) / 127.5 - 1.0)
    means = crops.reshape(crops.shape[0], -1).mean(axis=1)
    idx = np.abs(means[:, None] - levels[None]).argmin(axis=1)
    np.testing.assert_allclose(means, levels[idx], atol=0.02)  # really one of the images
    return idx


def test_sidecar_captions_and_keys(tmp_path):
    names = _folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    assert read_captions(src.path, src.files) == {"a.png": "a red car", "b.png": "",
                                                  "sub/c.png": "a red car", "d.png": "two cats"}
    (tmp_path / "notes.md").write_text("not an image")
    source = CaptionedFolderSource(tmp_path)
    assert source.embed_shape == (T, D) and len(source) == 4
    # Captions and the embeddings file are the folder's own, not skipped images; others are.
    assert [os.path.basename(f) for f, _ in source.skipped] == ["notes.md"]
    for i in range(4):
        item = source[i]
        want = names.index(os.path.relpath(source.files[i], tmp_path).replace(os.sep, "/"))
        assert item["image"][0, 0, 0] == GREYS[want]
        np.testing.assert_array_equal(item["prompt_embeds"], np.full((T, D), want + 1.0))
    np.testing.assert_array_equal(source.empty_embedding, np.zeros((T, D)))


@pytest.mark.parametrize("task", ["sr", "pretrain"])
def test_every_crop_carries_its_own_images_embedding(tmp_path, task):
    _folder(tmp_path)
    cfg = _cfg(tmp_path)
    sr = SRPairTransform(degradation_config(), 16) if task == "sr" else None
    ds = build_train_dataset(cfg, task=task, sr_transform=sr)
    seen = set()
    for b in range(6):
        batch = ds[b]
        assert batch["prompt_embeds"].shape == (4, T, D)
        assert batch["prompt_embeds"].dtype == np.float32
        idx = _grey_index(batch["image"])
        seen |= set(idx.tolist())
        np.testing.assert_array_equal(batch["prompt_embeds"][:, 0, 0], idx + 1.0)
    assert seen == {0, 1, 2, 3}
    ev = make_eval_set(cfg, task=task, sr_transform=sr, num_crops=8)
    np.testing.assert_array_equal(ev["prompt_embeds"][:, 0, 0], _grey_index(ev["image"]) + 1.0)


def test_dropout_rate_and_the_crops_do_not_change(tmp_path):
    """Dropout draws after the inner transform: the crops and degradations are the same as
    without it; over 400 examples the empty-prompt share is within 4 sigma of the rate."""
    _folder(tmp_path)
    sr = SRPairTransform(degradation_config(), 16)
    plain = build_train_dataset(_cfg(tmp_path), task="sr", sr_transform=sr)
    dropped = build_train_dataset(_cfg(tmp_path, prompt_dropout=0.3), task="sr", sr_transform=sr)
    empty = kept = 0
    for b in range(100):
        p, d = plain[b], dropped[b]
        for key in ("image", "lq", "cond"):
            np.testing.assert_array_equal(p[key], d[key])
        is_empty = (d["prompt_embeds"] == 0).all(axis=(1, 2))
        np.testing.assert_array_equal(d["prompt_embeds"][~is_empty], p["prompt_embeds"][~is_empty])
        empty, kept = empty + is_empty.sum(), kept + (~is_empty).sum()
    n = empty + kept
    assert abs(empty / n - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    ev = make_eval_set(_cfg(tmp_path, prompt_dropout=0.3), task="sr", sr_transform=sr,
                       num_crops=8)
    assert (ev["prompt_embeds"] != 0).all()  # evaluation never drops


def test_stale_missing_and_mismatched_embeddings_are_named(tmp_path):
    _folder(tmp_path)
    Image.fromarray(np.full((40, 40, 3), 5, np.uint8)).save(tmp_path / "new.png")
    with pytest.raises(ValueError, match=r"no embedding for 1 of the 5 images.*new\.png.*remake"):
        CaptionedFolderSource(tmp_path)
    os.remove(tmp_path / EMBEDS_FILE)
    with pytest.raises(ValueError, match="has no cdd_jax_prompt_embeds.safetensors.*"
                                         "cdd_jax.convert.captions"):
        make_source(_cfg(tmp_path), "train")
    _folder(tmp_path)
    check_caption_shapes(_cfg(tmp_path), (T, D))
    with pytest.raises(ValueError, match=r"are \[3, 4\].*teacher's are \[77, 768\]"):
        check_caption_shapes(_cfg(tmp_path), (77, 768))
    with pytest.raises(ValueError, match="expected"):
        write_prompt_embeds(tmp_path, {"a.png": np.zeros((T + 1, D))}, np.zeros((T, D)))


def test_config_misuse_is_named(tmp_path):
    c = sd_config("tiny")
    c.data.prompts = "captions"  # bundled photos have no captions
    with pytest.raises(ValueError, match="needs data.source='folder'"):
        validate_config(c)
    c = sd_config("tiny")
    c.data.prompt_dropout = 0.1
    with pytest.raises(ValueError, match="prompt_dropout drops per-example prompts"):
        validate_config(c)
    c = sd_config("tiny")
    c.data.update(prompts="captions", source="folder", folder=str(tmp_path))
    c.model.family = "unet2d"
    with pytest.raises(ValueError, match="text-conditioned teacher"):
        validate_config(c)
