"""A TFDS builder that packs local image files into an ArrayRecord dataset, fully offline.

Use it to turn a folder of images into a TFDS dataset that `TfdsImageSource` (and any TFDS
tool) can read random-access:

    builder = LocalImages(image_dir="/path/images", data_dir="/path/tfds")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    # then: data.source="tfds", data.tfds_name="local_images", data.tfds_data_dir="/path/tfds"

`LocalImagePairs(lr_dir=..., hr_dir=..., data_dir=...)` does the same for aligned LR/HR pairs
matched by file name (features "lr", "hr", "filename"; every pair goes to "train"), read with
data.source="tfds_paired", data.tfds_name="local_image_pairs".

If `image_dir` has sub-folders named after splits ("train", "validation", "test"), each becomes
that split; otherwise every image goes to "train". Unreadable files are skipped as in
`ImageFolderSource`. The class lives in an importable module (not `__main__`) because TFDS
registers builders by class definition and grain worker processes re-import it.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cdd_jax.data.images import decode_image
from cdd_jax.data.paired import match_pairs
from cdd_jax.data.sources import scan_image_folder

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "validation", "test")


class LocalImages(tfds.core.GeneratorBasedBuilder):
    """Local image files as a TFDS dataset: features {"image": uint8 RGB, "filename": text}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images from a local folder."}
    # TFDS infers where a builder's code and metadata (README, checksums) live from its package,
    # which fails when cdd_jax is imported as a namespace package (some editable installs); say
    # it explicitly. There are no metadata files: nothing is downloaded.
    code_path = epath.Path(os.path.abspath(__file__))
    pkg_dir_path = code_path.parent

    def __init__(self, *, image_dir: str | os.PathLike | None = None, **kwargs):
        # image_dir is only needed to prepare the dataset; reading it needs only data_dir.
        self._image_dir = None if image_dir is None else os.fspath(image_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Images from a local folder, re-encoded as PNG.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        if self._image_dir is None:
            raise ValueError("LocalImages needs image_dir=... to prepare the dataset")
        if not os.path.isdir(self._image_dir):
            raise ValueError(f"LocalImages image_dir {self._image_dir!r} is not a directory")
        sub = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(self._image_dir, s))]
        if sub:
            return {s: self._generate_examples(os.path.join(self._image_dir, s)) for s in sub}
        return {"train": self._generate_examples(self._image_dir)}

    def _generate_examples(self, folder: str):
        files, _ = scan_image_folder(folder, recursive=True, verify="header")
        if not files:
            raise ValueError(f"no readable images in {folder!r}")
        for file in files:
            try:
                image = decode_image(file)
            except ValueError as e:  # Passed the header check but the pixels are broken.
                logger.warning("LocalImages: skipping %s", e)
                continue
            key = os.path.relpath(file, folder)
            yield key, {"image": _png_bytes(image), "filename": key}


class LocalImagePairs(tfds.core.GeneratorBasedBuilder):
    """Aligned LR/HR image pairs from two local folders (matched by name) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LR/HR pairs from two local folders."}
    code_path = epath.Path(os.path.abspath(__file__))
    pkg_dir_path = code_path.parent

    def __init__(self, *, lr_dir: str | None = None, hr_dir: str | None = None, **kwargs):
        self._dirs = (lr_dir, hr_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
        return self.dataset_info_from_configs(
            description="Aligned LR/HR pairs from two local folders, re-encoded as PNG.",
            features=tfds.features.FeaturesDict(
                {"lr": image, "hr": image, "filename": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        if None in self._dirs:
            raise ValueError("LocalImagePairs needs lr_dir=... and hr_dir=... to prepare")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        pairs, _ = match_pairs(*map(os.fspath, self._dirs))
        for name, lr_path, hr_path in pairs:
            lr, hr = decode_image(lr_path), decode_image(hr_path)
            yield name, {"lr": _png_bytes(lr), "hr": _png_bytes(hr), "filename": name}


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG-encodes with PIL (TFDS would encode numpy arrays through TensorFlow, ~10 s to load)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
