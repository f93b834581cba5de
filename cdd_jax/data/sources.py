"""Random-access image sources (grain RandomAccessDataSource protocol: __len__, __getitem__).

Every source returns one image per index as uint8 (H, W, 3) RGB. Sources:
- `BundledImages` (cdd_jax.data.bundled): photos shipped in pip wheels, fixed train/eval split;
- `ImageFolderSource`: image files under a directory;
- `TfdsImageSource`: one image feature of a prepared TFDS dataset, read with `tfds.data_source`
  (ArrayRecord files, no TensorFlow needed).
`make_source(data_cfg, split)` picks one from the `data` config section.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from cdd_jax.data.bundled import BundledImages
from cdd_jax.data.images import IMAGE_EXTENSIONS, check_image_header, decode_image, to_rgb_uint8

logger = logging.getLogger(__name__)


class ImageSource(Protocol):
    """What the pipelines need from a source: a length and uint8 RGB images by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


# ----------------------------------------------------------------------------- image folders


def list_files(path: str | os.PathLike, recursive: bool = True) -> list[str]:
    """All regular files under `path` (sorted, so the record order is the same on every host)."""
    root = os.fspath(path)
    if recursive:
        files = [
            os.path.join(dirpath, name)
            for dirpath, _, names in os.walk(root)
            for name in names
            if os.path.isfile(os.path.join(dirpath, name))
        ]
    else:
        files = [
            os.path.join(root, name)
            for name in os.listdir(root)
            if os.path.isfile(os.path.join(root, name))
        ]
    return sorted(files)


def scan_image_folder(
    path: str | os.PathLike, recursive: bool = True, verify: str = "header",
    ignore: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits the files under `path` into usable images and skipped files (with reasons);
    files for which `ignore(path)` is true (e.g. a captioned folder's captions) are neither.

    verify: "header" opens each file with PIL and verifies its structure without decoding the
    pixels (cheap; catches non-images, empty, random-byte and most corrupt files), "decode" fully
    decodes every file (slow, catches truncated JPEG bodies too), "none" only checks the extension
    and that the file is not empty.
    """
    if verify not in ("none", "header", "decode"):
        raise ValueError(f"verify must be 'none', 'header' or 'decode', got {verify!r}")
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory")
    good: list[str] = []
    skipped: list[tuple[str, str]] = []
    for file in list_files(root, recursive):
        if ignore is not None and ignore(file):
            continue
        if not file.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append((file, "not an image file extension"))
            continue
        if verify == "none":
            reason = "empty file" if os.path.getsize(file) == 0 else None
        elif verify == "header":
            reason = check_image_header(file)
        else:
            try:
                decode_image(file)
                reason = None
            except ValueError as e:
                reason = str(e)
        if reason is None:
            good.append(file)
        else:
            skipped.append((file, reason))
    return good, skipped


class ImageFolderSource:
    """Images under a folder (jpg, jpeg, png, bmp, webp, tif, tiff), decoded on access.

    The folder is scanned once at construction (see `scan_image_folder` for `verify`): files that
    are not images, empty or corrupt are skipped and their number is logged (and kept in
    `self.skipped` as (path, reason) pairs). No usable image -> ValueError naming the folder, so a
    bad path fails before any model is built or compiled. Decoded images are not cached (folders
    can be large); greyscale, RGBA, palette and 16-bit files are converted to uint8 RGB and the
    EXIF orientation is applied (cdd_jax.data.images).

    A file that passed the scan but fails to decode later (e.g. a JPEG truncated after its
    header) is logged and replaced by the next readable image in the list, so one bad file cannot
    stop a long run; the replacement is deterministic, so batches stay reproducible.
    """

    def __init__(self, path: str | os.PathLike, recursive: bool = True, verify: str = "header",
                 ignore: Callable[[str], bool] | None = None):
        self.path = os.fspath(path)
        self.files, self.skipped = scan_image_folder(self.path, recursive, verify, ignore)
        if self.skipped:
            reasons = Counter(
                "not an image" if r == "not an image file extension" else "unreadable"
                for _, r in self.skipped
            )
            logger.warning(
                "ImageFolderSource(%r): skipped %d file(s) (%s); first: %s",
                self.path,
                len(self.skipped),
                ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())),
                "; ".join(f"{f} ({r})" for f, r in self.skipped[:3]),
            )
        if not self.files:
            raise ValueError(
                f"no readable images in folder {self.path!r} "
                f"({len(self.skipped)} file(s) skipped; extensions accepted: {IMAGE_EXTENSIONS})"
            )
        logger.info("ImageFolderSource(%r): %d images", self.path, len(self.files))

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.load(index)[1]

    def load(self, index: int) -> tuple[str, np.ndarray]:
        """(file, image) of `index`: its image, or the next readable one if it fails to decode."""
        n = len(self.files)
        errors = []
        for offset in range(min(n, 16)):
            file = self.files[(int(index) + offset) % n]
            try:
                return file, decode_image(file)
            except ValueError as e:
                logger.warning("ImageFolderSource: %s; using the next image instead", e)
                errors.append(str(e))
        raise ValueError(f"could not decode {len(errors)} consecutive images: {errors}")

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={self.path!r}, num_images={len(self.files)})"


# ----------------------------------------------------------------------------- TFDS


def find_image_key(features: Any, image_key: str | None, dataset: str) -> str:
    """Returns the name of the image feature to read (the given one, or the single Image one)."""
    import tensorflow_datasets as tfds

    if not isinstance(features, tfds.features.FeaturesDict):
        raise ValueError(f"TFDS dataset {dataset!r} has no feature dict: {features!r}")
    described = {k: type(v).__name__ for k, v in features.items()}
    images = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
    if image_key is not None:
        if image_key not in described:
            raise ValueError(
                f"image_key {image_key!r} is not a feature of TFDS dataset {dataset!r}; "
                f"features: {described}"
            )
        if image_key not in images:
            raise ValueError(
                f"feature {image_key!r} of TFDS dataset {dataset!r} is a "
                f"{described[image_key]}, not an Image; features: {described}"
            )
        return image_key
    if not images:
        raise ValueError(f"TFDS dataset {dataset!r} has no Image feature; features: {described}")
    if len(images) > 1:
        raise ValueError(
            f"TFDS dataset {dataset!r} has several Image features {images}; set data.image_key"
        )
    return images[0]


def open_tfds(name: str, data_dir: str | None) -> Any:
    """The TFDS builder of a prepared dataset; ValueError naming it when it cannot be opened."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot open TFDS dataset {name!r} (data_dir={data_dir!r}): {first_line}"
        ) from e


class TfdsImageSource:
    """The image feature of one split of a prepared TFDS dataset, via `tfds.data_source`.

    Reads ArrayRecord files random-access without TensorFlow; never downloads (`download=False`),
    so a missing dataset is an error naming it and the data dir. The TFDS data source is reopened
    lazily after pickling, so the object can be sent to grain worker processes.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | os.PathLike | None = None,
        image_key: str | None = None,
    ):
        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.image_key = find_image_key(open_tfds(name, self.data_dir).info.features, image_key,
                                        name)
        self._source: Sequence[Any] | None = None
        try:
            self._open()
        except Exception as e:
            raise ValueError(
                f"cannot read split {split!r} of TFDS dataset {name!r} "
                f"(data_dir={self.data_dir!r}; is it prepared as array_record?): {e}"
            ) from e
        if len(self._source) == 0:
            raise ValueError(f"split {split!r} of TFDS dataset {name!r} is empty")

    def _open(self) -> Sequence[Any]:
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir, download=False
            )
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> np.ndarray:
        return to_rgb_uint8(self._open()[int(index)][self.image_key])

    def __repr__(self) -> str:
        return (
            f"TfdsImageSource(name={self.name!r}, split={self.split!r}, "
            f"data_dir={self.data_dir!r}, image_key={self.image_key!r})"
        )


# ----------------------------------------------------------------------------- from config


def folder_of(data_cfg: ml_collections.ConfigDict, split: str) -> str:
    """The image folder of split "train" or "eval" for data.source="folder"."""
    folder = data_cfg.folder
    if split == "eval":
        if data_cfg.eval_folder:
            folder = data_cfg.eval_folder
        else:
            logger.warning(
                "data.eval_folder is not set: evaluation crops come from the training folder "
                "%r and are NOT held out",
                folder,
            )
    if not folder:
        raise ValueError("data.source='folder' needs data.folder (a directory of images)")
    return folder


def make_source(data_cfg: ml_collections.ConfigDict, split: str) -> ImageSource:
    """The source named by `data_cfg.source` for split "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data_cfg.source == "bundled":
        return BundledImages(split)
    if data_cfg.source == "folder":
        return ImageFolderSource(folder_of(data_cfg, split))
    if data_cfg.source == "tfds":
        if not data_cfg.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        tfds_split = data_cfg.tfds_split if split == "train" else data_cfg.tfds_eval_split
        return TfdsImageSource(
            data_cfg.tfds_name, tfds_split, data_cfg.tfds_data_dir, data_cfg.image_key
        )
    raise ValueError(
        f"unknown image source {data_cfg.source!r}; expected bundled, folder or tfds (paired "
        "sources: cdd_jax.data.paired.make_paired_source, or cdd_jax.data.pipeline.make_source)"
    )
