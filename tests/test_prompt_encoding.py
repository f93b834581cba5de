"""Prompts encoded with a pipeline's own text encoder (needs the `peers` extra: torch,
transformers, diffusers; a counted skip without it). A tiny SD pipeline is made locally with
diffusers (tiny CLIP tokenizer and text encoder, U-Net, VAE) and saved the way diffusers saves
one; diffusers' own `StableDiffusionPipeline.encode_prompt` is the independent reference for the
stored empty-prompt embedding and for every caption embedding of a captioned folder, and the
folder then resolves as a cdd_jax teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from cdd_jax.convert.captions import embed_folder  # noqa: E402
from cdd_jax.convert.sd import compute_prompt_embeds, load_prompt_embeds  # noqa: E402
from cdd_jax.data.captions import CaptionedFolderSource  # noqa: E402

MAX_LEN, WIDTH = 8, 32
WORDS = ("a", "red", "car", "two", "cats")


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of bytes that byte-level BPE vocabularies use (printable
    Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tiny_tokenizer(out):
    """A CLIP BPE tokenizer whose merges spell WORDS as one token each."""
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"),
                                     model_max_length=MAX_LEN)
    return tok, len(vocab)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdpipe")
    tok, n_vocab = _tiny_tokenizer(root / "tok_src")
    assert tok("a red car").input_ids == [n_vocab - 2, *(tok.convert_tokens_to_ids(w + "</w>")
                                                         for w in ("a", "red", "car")),
                                          n_vocab - 1]
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=n_vocab, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LEN,
        bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                          "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=WIDTH, attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,  # SD's
                                          beta_schedule="scaled_linear", clip_sample=False,
                                          set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = root / "pipeline"
    pipe.save_pretrained(folder)
    return folder, pipe


def _reference(pipe, prompt: str) -> np.ndarray:
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return embeds.float().numpy()


def test_stored_empty_prompt_equals_diffusers_encode_prompt(pipeline_folder):
    folder, pipe = pipeline_folder
    got = compute_prompt_embeds(folder, "")
    want = _reference(pipe, "")
    assert got.shape == want.shape == (1, MAX_LEN, WIDTH)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(load_prompt_embeds(folder), got)
    # A different prompt gives a different embedding (the check above can fail).
    assert np.abs(_reference(pipe, "two cats") - want).max() > 1e-2


def test_captioned_folder_embeddings_equal_diffusers_encode_prompt(pipeline_folder, tmp_path):
    folder, pipe = pipeline_folder
    captions = {"a.png": "a red car", "b.png": "", "c.png": "two cats", "d.png": "a red car"}
    for i, (name, cap) in enumerate(captions.items()):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / name)
        if cap:
            (tmp_path / name).with_suffix(".txt").write_text(cap)
    embed_folder(folder, tmp_path, batch_size=2)
    source = CaptionedFolderSource(tmp_path)
    assert source.embed_shape == (MAX_LEN, WIDTH)
    for i in range(len(source)):
        name = source.keys[i]
        np.testing.assert_allclose(source[i]["prompt_embeds"], _reference(pipe, captions[name])[0],
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(source.empty_embedding, _reference(pipe, "")[0], atol=1e-6)


def test_the_diffusers_saved_folder_resolves_as_a_teacher(pipeline_folder):
    from cdd_jax.config.presets import sd_config
    from cdd_jax.stages.teacher import resolve_teacher

    folder, _ = pipeline_folder
    compute_prompt_embeds(folder, "")
    c = sd_config("tiny")
    c.teacher.checkpoint = str(folder)
    c.model.prompt_embed_dim = WIDTH
    resolve_teacher(c)
    assert (c.model.prompt_tokens, c.model.prompt_embed_dim) == (MAX_LEN, WIDTH)
