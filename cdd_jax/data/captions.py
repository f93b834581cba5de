"""Per-example prompts: image folders whose images carry a caption, for text-conditioned teachers.

A captioned folder is an image folder (`ImageFolderSource`) plus one file, written once, that
holds every image's prompt embedding:

    DIR/a.png, DIR/a.txt, DIR/sub/b.jpg, DIR/sub/b.txt, ...   images and their captions
    DIR/cdd_jax_prompt_embeds.safetensors                     {relative image path: [T, D]}
                                                              plus "" -> the empty prompt's

The captions are the usual sidecar files (same name, `.txt`); an image without one gets the
empty prompt. The embeddings are computed ahead by the teacher's own text encoder
(`python -m cdd_jax.convert.captions --teacher=PIPELINE --folder=DIR`, which needs torch +
transformers: the `peers` extra), or written by any other encoder with `write_prompt_embeds`,
so training reads arrays and needs neither. `data.prompts="captions"` makes the folder sources
yield {"image", "prompt_embeds"}; `data.prompt_dropout` replaces a training example's embedding
with the empty prompt's at that rate (what classifier-free guidance needs of a model).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from cdd_jax.data.sources import ImageFolderSource, folder_of
from cdd_jax.fileio import write_atomic

logger = logging.getLogger(__name__)

EMBEDS_FILE = "cdd_jax_prompt_embeds.safetensors"
EMPTY = ""  # The key of the empty prompt's embedding.
FORMAT = "cdd_jax.prompt_embeds/1"
MAKE_COMMAND = "python -m cdd_jax.convert.captions --teacher=PIPELINE --folder={folder}"


def image_key(folder: str | os.PathLike, file: str | os.PathLike) -> str:
    """The key of `file` in `folder`'s embeddings file: its path relative to the folder, with /."""
    rel = os.path.relpath(os.fspath(file), os.fspath(folder))
    if rel.startswith(".."):
        raise ValueError(f"{file!r} is not under {folder!r}")
    return rel.replace(os.sep, "/")


def is_caption_file(path: str) -> bool:
    """A captioned folder's own non-image files: the sidecar captions and the embeddings file."""
    return path.endswith(".txt") or os.path.basename(path) == EMBEDS_FILE


def read_captions(folder: str | os.PathLike, files: Sequence[str]) -> dict[str, str]:
    """{image key: caption} from the sidecar `.txt` of each image ("" where there is none;
    surrounding white space stripped)."""
    captions = {}
    for file in files:
        sidecar = os.path.splitext(file)[0] + ".txt"
        text = ""
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                text = f.read().strip()
        captions[image_key(folder, file)] = text
    return captions


def write_prompt_embeds(folder: str | os.PathLike, embeds: Mapping[str, np.ndarray],
                        empty: np.ndarray, *, captions: Mapping[str, str] | None = None,
                        source: str = "") -> str:
    """Writes `folder`'s embeddings file (atomically): `embeds` {image key: [T, D]} and the empty
    prompt's [T, D] (or [1, T, D]); `captions` and `source` (e.g. the teacher) go in its
    metadata. Returns its path."""
    from safetensors.numpy import save

    empty = np.asarray(empty, np.float32)
    empty = empty[0] if empty.ndim == 3 and empty.shape[0] == 1 else empty
    if empty.ndim != 2:
        raise ValueError(f"the empty prompt's embedding must be [T, D], got shape {empty.shape}")
    tensors = {EMPTY: empty}
    for key, value in embeds.items():
        value = np.asarray(value, np.float32)
        if key == EMPTY or value.shape != empty.shape:
            raise ValueError(f"embedding of {key!r}: shape {value.shape}, expected {empty.shape} "
                             "(every prompt embedding is [T, D] like the empty prompt's)")
        tensors[key] = value
    meta = {"format": FORMAT, "source": source,
            "captions": json.dumps(dict(captions or {}), ensure_ascii=False)}
    path = os.path.join(os.fspath(folder), EMBEDS_FILE)
    write_atomic(path, save(tensors, metadata=meta))
    return path


def embeds_path(folder: str | os.PathLike) -> str:
    """The embeddings file of `folder`; ValueError saying how to make it when it is missing."""
    path = os.path.join(os.fspath(folder), EMBEDS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"data.prompts='captions': {os.fspath(folder)!r} has no {EMBEDS_FILE}; "
                         f"make it once with `{MAKE_COMMAND.format(folder=os.fspath(folder))}` "
                         "(or cdd_jax.data.captions.write_prompt_embeds)")
    return path


def embed_shape(folder: str | os.PathLike) -> tuple[int, int]:
    """[T, D] of the prompt embeddings stored for `folder` (reads the file's header only)."""
    from safetensors import safe_open

    with safe_open(embeds_path(folder), framework="numpy") as f:
        if (f.metadata() or {}).get("format") != FORMAT or EMPTY not in f.keys():
            raise ValueError(f"{embeds_path(folder)} is not a cdd_jax prompt-embedding file")
        return tuple(f.get_slice(EMPTY).get_shape())


class CaptionedFolderSource(ImageFolderSource):
    """An image folder whose items are {"image": uint8 HxWx3, "prompt_embeds": float32 [T, D]}.

    Every usable image must have an embedding in the folder's file (else ValueError counting the
    ones without and saying how to remake the file, so a stale file fails before any compile).
    The file is opened lazily (and again after pickling, for grain workers); an image replaced
    by the next readable one (see ImageFolderSource) brings that image's embedding.
    """

    prompts = True

    def __init__(self, path: str | os.PathLike, recursive: bool = True, verify: str = "header"):
        super().__init__(path, recursive, verify, ignore=is_caption_file)
        self.embeds_file = embeds_path(self.path)
        self.embed_shape = embed_shape(self.path)
        self.keys = [image_key(self.path, f) for f in self.files]
        self._key_of = dict(zip(self.files, self.keys, strict=True))
        have = set(self._open().keys())
        missing = [k for k in self.keys if k not in have]
        if missing:
            raise ValueError(
                f"{self.embeds_file} has no embedding for {len(missing)} of the "
                f"{len(self.keys)} images (first: {missing[:3]}); it is older than the folder: "
                f"remake it with `{MAKE_COMMAND.format(folder=self.path)}`")
        self.empty_embedding = self._open().get_tensor(EMPTY)

    def _open(self) -> Any:
        if getattr(self, "_file", None) is None:
            from safetensors import safe_open

            self._file = safe_open(self.embeds_file, framework="numpy")
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        file, image = self.load(index)
        return {"image": image, "prompt_embeds": self._open().get_tensor(self._key_of[file])}

    def __repr__(self) -> str:
        return (f"CaptionedFolderSource(path={self.path!r}, num_images={len(self.files)}, "
                f"embeds={tuple(self.embed_shape)})")


class WithPrompt(grain.transforms.RandomMap):
    """Runs `inner` on a record without its "prompt_embeds" and puts them back in its output;
    with probability `dropout` (drawn after `inner`, so its randomness is unchanged) they are
    replaced by `empty`, the empty prompt's embedding."""

    def __init__(self, inner: grain.transforms.RandomMap, dropout: float, empty: np.ndarray):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"prompt dropout must be in [0, 1), got {dropout}")
        self.inner, self.dropout = inner, float(dropout)
        self.empty = np.asarray(empty, np.float32)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        prompt = element["prompt_embeds"]
        out = self.inner.random_map({k: v for k, v in element.items() if k != "prompt_embeds"},
                                    rng)
        if self.dropout and rng.random() < self.dropout:
            prompt = self.empty
        return {**out, "prompt_embeds": np.asarray(prompt, np.float32)}

    def __repr__(self) -> str:
        return f"WithPrompt({self.inner!r}, dropout={self.dropout})"


def check_caption_shapes(data_cfg, expected: Sequence[int]) -> None:
    """ValueError unless the prompt embeddings of the training and evaluation folders are
    `expected` [T, D] (the teacher's stored prompt embedding): checked before any compile."""
    for split in ("train", "eval"):
        folder = folder_of(data_cfg, split)
        shape = embed_shape(folder)
        if tuple(shape) != tuple(expected):
            raise ValueError(f"the prompt embeddings of {folder!r} are {list(shape)} (tokens, "
                             f"width) but the teacher's are {list(expected)}: they were made "
                             "with another text encoder; remake them with "
                             f"`{MAKE_COMMAND.format(folder=folder)}` and this teacher")
