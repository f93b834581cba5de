"""Data: image sources (bundled photos, image folders, TFDS), sources of aligned LR/HR pairs
(folders, TFDS) and grain pipelines.

numpy / grain / PIL only; nothing here imports the networks or the training code.
`cdd_jax.data.tfds_local` (a TFDS builder for local images) is not imported here, so that
importing the package does not register a TFDS builder as a side effect.
"""

from cdd_jax.data.bundled import (
    EVAL_IMAGES,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    BundledImages,
)
from cdd_jax.data.config import data_config, validate_data_config
from cdd_jax.data.images import decode_image, pad_to_min_size, to_rgb_uint8
from cdd_jax.data.paired import PairedCrop, PairedFolderSource, TfdsPairedSource
from cdd_jax.data.pipeline import (
    RandomCropFlip,
    build_train_dataset,
    make_eval_set,
    make_source,
    make_sr_transform,
    make_train_iterator,
)
from cdd_jax.data.sources import ImageFolderSource, TfdsImageSource

__all__ = [
    "EVAL_IMAGES",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "VALIDATION_IMAGES",
    "BundledImages",
    "ImageFolderSource",
    "PairedCrop",
    "PairedFolderSource",
    "RandomCropFlip",
    "TfdsImageSource",
    "TfdsPairedSource",
    "build_train_dataset",
    "data_config",
    "decode_image",
    "make_eval_set",
    "make_source",
    "make_sr_transform",
    "make_train_iterator",
    "pad_to_min_size",
    "to_rgb_uint8",
    "validate_data_config",
]
