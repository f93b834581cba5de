"""The `data` section of the configuration and its validation."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cdd_jax import config_checks as checks

SOURCES = ("bundled", "folder", "tfds", "paired_folders", "tfds_paired")
# Sources of aligned (LR, HR) pairs (cdd_jax.data.paired): crops of both instead of degradation.
PAIRED_SOURCES = ("paired_folders", "tfds_paired")
PROMPTS = ("none", "captions")


def data_config() -> ml_collections.ConfigDict:
    """Default data settings: the bundled photos, 64 px crops, global batch 16."""
    c = ml_collections.ConfigDict()
    # Where images come from: "bundled" (photos shipped in scikit-image / scikit-learn wheels,
    # fixed train/eval split), "folder" (image files under `folder`) or "tfds" (an ArrayRecord
    # TFDS dataset read with tfds.data_source, no TensorFlow needed); aligned LR/HR pairs instead
    # of degraded HR images: "paired_folders" (lr_dir, hr_dir) or "tfds_paired" (two features).
    c.source = "bundled"
    # Folder of training images (jpg/png/bmp/webp/tiff, searched recursively); source="folder".
    c.folder = ""
    # Folder of held-out evaluation images; None = evaluate on crops of `folder` (not held out,
    # a warning is logged).
    c.eval_folder = config_dict.placeholder(str)
    # Paired data ("paired_folders", "tfds_paired"; cdd_jax.data.paired): the LR is given, not
    # made by the degradation section. Every HR must be exactly `scale` x its LR in both sides.
    c.scale = 4
    # Folders of LR and HR images matched by file name without extension (relative path under
    # the folder); names found in only one folder are skipped and counted. source="paired_folders".
    c.lr_dir = ""
    c.hr_dir = ""
    # Held-out pairs for evaluation crops: both folders set = a separate pair of folders; neither
    # = a fixed `eval_fraction` of the pairs of lr_dir/hr_dir (chosen by a hash of the name, so
    # it does not depend on file order) is held out of training.
    c.eval_lr_dir = config_dict.placeholder(str)
    c.eval_hr_dir = config_dict.placeholder(str)
    c.eval_fraction = 0.1
    # Names of the LR and HR Image features of a paired TFDS dataset; source="tfds_paired" (which
    # reads tfds_name, tfds_split, tfds_eval_split and tfds_data_dir like "tfds").
    c.lr_feature = "lr"
    c.hr_feature = "hr"
    # Alignment check when a paired source opens: this many pairs (evenly spread) are decoded and
    # the area-downsampled HR compared with the LR; a shifted or unrelated pair is an error
    # naming it. 0 = no check.
    c.align_check_pairs = 8
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
    # Per-example prompts of a text-conditioned teacher: "none" (the teacher's stored prompt) or
    # "captions" (source="folder": each image's caption embedding, from the folder's
    # cdd_jax_prompt_embeds.safetensors; cdd_jax.data.captions). Training and the evaluation
    # crops both read them.
    c.prompts = "none"
    # With prompts="captions": a training example's embedding is replaced by the empty prompt's
    # with this probability (so the model also learns the unconditional branch that
    # classifier-free guidance needs); 0 = never.
    c.prompt_dropout = 0.0
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
    for key in ("num_workers", "read_threads", "prefetch", "min_image_size", "align_check_pairs"):
        checks.number(cfg, key, 0, integer=True, prefix="data.")
    for key in ("seed", "eval_seed"):
        checks.number(cfg, key, 0, 2**32, hi_open=True, integer=True, prefix="data.")
    for key in ("random_flip", "shuffle"):
        checks.boolean(cfg, key, prefix="data.")
    checks.number(cfg, "scale", 1, integer=True, prefix="data.")
    checks.number(cfg, "eval_fraction", 0, 1, lo_open=True, hi_open=True, prefix="data.")
    checks.choice(cfg, "prompts", PROMPTS, prefix="data.")
    checks.number(cfg, "prompt_dropout", 0, 1, hi_open=True, prefix="data.")
    if cfg.prompts == "captions" and cfg.source != "folder":
        raise ValueError(f"data.prompts='captions' reads captioned image folders: it needs "
                         f"data.source='folder', got {cfg.source!r}")
    if cfg.prompt_dropout and cfg.prompts == "none":
        raise ValueError("data.prompt_dropout drops per-example prompts: it needs "
                         "data.prompts='captions'")
    if cfg.source in PAIRED_SOURCES:
        _validate_paired(cfg)
    if cfg.source == "folder" and not cfg.folder:
        raise ValueError("data.source='folder' needs data.folder (a directory of images)")
    if cfg.source == "tfds" and not cfg.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name (a TFDS dataset name)")


def _validate_paired(cfg: ml_collections.ConfigDict) -> None:
    if cfg.crop_size % cfg.scale:
        raise ValueError(f"data.crop_size {cfg.crop_size} must be a multiple of data.scale "
                         f"{cfg.scale} for paired data (the LR crop is crop_size / scale)")
    if cfg.source == "paired_folders":
        if not cfg.lr_dir or not cfg.hr_dir:
            raise ValueError("data.source='paired_folders' needs data.lr_dir and data.hr_dir "
                             "(folders of LR and HR images matched by file name)")
        if bool(cfg.eval_lr_dir) != bool(cfg.eval_hr_dir):
            raise ValueError("set both data.eval_lr_dir and data.eval_hr_dir, or neither (then "
                             "data.eval_fraction of the pairs is held out)")
    else:
        if not cfg.tfds_name:
            raise ValueError("data.source='tfds_paired' needs data.tfds_name")
        if not cfg.lr_feature or not cfg.hr_feature or cfg.lr_feature == cfg.hr_feature:
            raise ValueError(f"data.lr_feature {cfg.lr_feature!r} and data.hr_feature "
                             f"{cfg.hr_feature!r} must be two different feature names")
