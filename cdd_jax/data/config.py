"""The `data` section of the configuration and its validation."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cdd_jax import config_checks as checks

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


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError/TypeError naming the first problem in a `data` section: unknown keys
    (with the closest valid names), missing keys, wrong types, out-of-range values, a source
    without its location."""
    checks.check_keys(cfg, data_config(), "data.")
    checks.choice(cfg, "source", SOURCES, prefix="data.")
    for key in ("crop_size", "batch_size", "num_eval_crops", "min_records_per_epoch"):
        checks.number(cfg, key, 1, integer=True, prefix="data.")
    for key in ("num_workers", "read_threads", "prefetch", "min_image_size"):
        checks.number(cfg, key, 0, integer=True, prefix="data.")
    for key in ("seed", "eval_seed"):
        checks.number(cfg, key, 0, 2**32, hi_open=True, integer=True, prefix="data.")
    for key in ("random_flip", "shuffle"):
        checks.boolean(cfg, key, prefix="data.")
    if cfg.source == "folder" and not cfg.folder:
        raise ValueError("data.source='folder' needs data.folder (a directory of images)")
    if cfg.source == "tfds" and not cfg.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name (a TFDS dataset name)")
