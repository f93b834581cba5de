"""The `data` section of the configuration and its validation."""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict

SOURCES = ("bundled", "folder", "tfds")


def data_config() -> ml_collections.ConfigDict:
    """Default data settings: the bundled photos, 64 px crops, global batch 16."""
    c = ml_collections.ConfigDict()
    # Where images come from: "bundled" (photos shipped in scikit-image / scikit-learn wheels,
    # fixed train/eval split), "folder" (image files under `folder`) or "tfds" (an ArrayRecord
    # TFDS dataset read with tfds.data_source, no TensorFlow needed).
    c.source = "bundled"
    # Folder of training images (jpg/png/bmp/webp/tiff, searched recursively); source="folder".
    c.folder = ""
    # Folder of held-out evaluation images; None = evaluate on crops of `folder` (not held out,
    # a warning is logged).
    c.eval_folder = config_dict.placeholder(str)
    # TFDS dataset name, e.g. "imagenet2012" or "my_dataset:1.0.0"; source="tfds".
    c.tfds_name = ""
    # TFDS split for training (slicing syntax allowed, e.g. "train[:90%]").
    c.tfds_split = "train"
    # TFDS split for evaluation crops.
    c.tfds_eval_split = "validation"
    # TFDS data directory; None = the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    c.tfds_data_dir = config_dict.placeholder(str)
    # Name of the image feature; None = auto-detect the single top-level Image feature.
    c.image_key = config_dict.placeholder(str)
    # Side of the square training crop in pixels (the GT size for super-resolution).
    c.crop_size = 64
    # GLOBAL batch size over all processes; each process yields batch_size / process_count.
    c.batch_size = 16
    # Grain worker processes for the training iterator; 0 = load in the main process.
    c.num_workers = 0
    # Threads per process reading and transforming records (grain ReadOptions.num_threads).
    c.read_threads = 2
    # Batches buffered ahead of the training step (per process, per worker when num_workers>0).
    c.prefetch = 4
    # Seed of the record shuffle and of every random crop / flip / degradation.
    c.seed = 0
    # Flip training crops horizontally with probability 1/2.
    c.random_flip = True
    # Shuffle records (with a different order every epoch); False = fixed sequential order.
    c.shuffle = True
    # Images with a side shorter than max(min_image_size, crop_size) are reflect-padded up to it
    # before cropping; 0 = pad only up to crop_size.
    c.min_image_size = 0
    # Records are repeated within an epoch until an epoch has at least this many crops, so tiny
    # datasets (the 7 bundled training photos) still shuffle over many crops per epoch.
    c.min_records_per_epoch = 512
    # Number of fixed evaluation crops taken from the eval split (cycled over its images).
    c.num_eval_crops = 64
    # Seed of the evaluation crops (and their degradations); the eval set is identical each call.
    c.eval_seed = 1234
    return c


_INT_FIELDS = (
    "crop_size",
    "batch_size",
    "num_workers",
    "read_threads",
    "prefetch",
    "seed",
    "min_image_size",
    "min_records_per_epoch",
    "num_eval_crops",
    "eval_seed",
)
_BOOL_FIELDS = ("random_flip", "shuffle")


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError/TypeError naming the first problem in a data config section.

    Unknown keys (typos) are reported with the closest valid names; missing keys, wrong types,
    out-of-range values and a source without its location are errors too.
    """
    expected = set(data_config().keys())
    given = set(cfg.keys())
    unknown = sorted(given - expected)
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(expected), n=3)
            described.append(f"{key!r} (did you mean {close}?)" if close else repr(key))
        raise ValueError(f"unknown data config key(s): {', '.join(described)}")
    missing = sorted(expected - given)
    if missing:
        raise ValueError(f"data config is missing key(s): {missing}")
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    for key in _INT_FIELDS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"data.{key} must be an int, got {value!r}")
    for key in _BOOL_FIELDS:
        if not isinstance(cfg[key], bool):
            raise TypeError(f"data.{key} must be a bool, got {cfg[key]!r}")
    for key in ("crop_size", "batch_size", "num_eval_crops", "min_records_per_epoch"):
        if cfg[key] <= 0:
            raise ValueError(f"data.{key} must be positive, got {cfg[key]}")
    for key in ("num_workers", "read_threads", "prefetch", "min_image_size"):
        if cfg[key] < 0:
            raise ValueError(f"data.{key} must be >= 0, got {cfg[key]}")
    for key in ("seed", "eval_seed"):
        if not 0 <= cfg[key] < 2**32:
            raise ValueError(f"data.{key} must be in [0, 2**32), got {cfg[key]}")
    if cfg.source == "folder" and not cfg.folder:
        raise ValueError("data.source='folder' needs data.folder (a directory of images)")
    if cfg.source == "tfds" and not cfg.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name (a TFDS dataset name)")
