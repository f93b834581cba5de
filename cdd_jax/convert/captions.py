"""Encodes the captions of an image folder once, for training with per-example prompts.

    python -m cdd_jax.convert.captions --teacher=PIPELINE_DIR --folder=IMAGES [--batch_size=32]

Reads each image's sidecar caption (`a.png` -> `a.txt`; none = the empty prompt), encodes every
distinct caption with the teacher pipeline's own tokenizer + text encoder (torch + transformers:
the `peers` extra) and writes IMAGES/cdd_jax_prompt_embeds.safetensors (cdd_jax.data.captions),
which `data.prompts="captions"` reads. Run it again after adding images or changing captions.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from cdd_jax.console import note, progress
from cdd_jax.convert.sd import encode_prompts
from cdd_jax.data.captions import EMPTY, is_caption_file, read_captions, write_prompt_embeds
from cdd_jax.data.sources import ImageFolderSource


def embed_folder(teacher: str | os.PathLike, folder: str | os.PathLike, *,
                 batch_size: int = 32) -> str:
    """Writes `folder`'s prompt-embedding file from its captions; returns its path."""
    source = ImageFolderSource(folder, ignore=is_caption_file)
    captions = read_captions(source.path, source.files)
    texts = sorted(set(captions.values()) | {EMPTY})
    with progress(total=len(texts), desc="encoding captions") as bar:
        done = [0]

        def advance(n):
            bar.update(n - done[0])
            done[0] = n

        encoded = encode_prompts(teacher, texts, batch_size=batch_size, progress=advance)
    by_text = dict(zip(texts, encoded, strict=True))
    embeds = {key: by_text[text] for key, text in captions.items()}
    uncaptioned = sum(1 for text in captions.values() if not text)
    path = write_prompt_embeds(source.path, embeds, by_text[EMPTY], captions=captions,
                               source=os.fspath(teacher))
    note("%d images, %d distinct captions (%d images without one: the empty prompt); "
         "embeddings %s written to %s", len(captions), len(texts) - 1 + (uncaptioned > 0),
         uncaptioned, list(np.shape(by_text[EMPTY])), path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True,
                    help="a local SD-style pipeline folder with tokenizer/ and text_encoder/")
    ap.add_argument("--folder", required=True, help="the image folder (captions as .txt)")
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args(argv)
    embed_folder(args.teacher, args.folder, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
