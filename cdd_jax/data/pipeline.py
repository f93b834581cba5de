"""Grain pipelines: infinite per-process training batches, their checkpointable iterator, and a
fixed evaluation set.

The training stream, in order (every random step has an explicit seed derived from data.seed):

    source (N images)
    -> repeat ceil(min_records_per_epoch / N) times   one "epoch" = max(N, min_records_per_epoch)
                                                      records, so 7 photos still give hundreds of
                                                      distinct crops per shuffled epoch
    -> shuffle(seed_shuffle)                          a different permutation every epoch
    -> repeat forever
    -> pad images smaller than the crop (reflect)     (not for pairs: PairedCrop reads them as
                                                      they are; see cdd_jax.data.paired)
    -> random_map(transform, seed_transform)          crop + flip (pretrain), the SR degradation
                                                      or the aligned crop of a given LR/HR pair;
                                                      the generator is derived from (seed, global
                                                      record index), so it does not depend on
                                                      threads, workers or hosts
    -> batch(batch_size // process_count)             local-size blocks of consecutive records
    -> [process_index::process_count]                 per-process share AFTER the random map, so
                                                      processes draw different randomness

Process p's j-th row of batch k is record k * batch_size + p * batch_size // process_count + j of
the single-process stream: the processes' batch k, concatenated in process order (what
`jax.make_array_from_process_local_data` builds), is exactly the single-process batch k, row for
row, and no record is used twice. Row order matters: the train step draws per-row noise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from cdd_jax.data import sources
from cdd_jax.data.captions import CaptionedFolderSource, WithPrompt
from cdd_jax.data.config import PAIRED_SOURCES, validate_data_config
from cdd_jax.data.degradations import SRPairTransform
from cdd_jax.data.images import pad_to_min_size
from cdd_jax.data.paired import PairedCrop, make_paired_source
from cdd_jax.data.sources import ImageSource

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "sr")

# Tags that give each random step its own seed stream.
_SHUFFLE, _TRAIN_TRANSFORM, _EVAL_TRANSFORM = 0, 1, 2


def derive_seed(seed: int, tag: int) -> int:
    """A 32-bit seed for one random step, derived from the config seed and a per-step tag."""
    return int(np.random.SeedSequence([int(seed), int(tag)]).generate_state(1)[0])


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return image.astype(np.float32) / 127.5 - 1.0


class PadToRecord(grain.transforms.Map):
    """uint8 image -> {"image": image reflect-padded to at least min_size x min_size}; a record
    {"image", ...} (a captioned source's) keeps its other entries."""

    def __init__(self, min_size: int):
        self.min_size = int(min_size)

    def map(self, image: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        record = dict(image) if isinstance(image, dict) else {"image": image}
        record["image"] = pad_to_min_size(record["image"], self.min_size, self.min_size)
        return record


class HighResolutionOnly(grain.transforms.Map):
    """A paired record -> its HR image (pretraining on the HR side of paired data)."""

    def map(self, element: dict[str, np.ndarray]) -> np.ndarray:
        return element["image"]


class RandomCropFlip(grain.transforms.RandomMap):
    """{"image": uint8 HxWx3} -> {"image": float32 (crop, crop, 3) in [-1, 1]}.

    A uniformly placed square crop, then a horizontal flip with probability 1/2 if random_flip.
    Uses only the generator grain passes in, so it is reproducible per record.
    """

    def __init__(self, crop_size: int, random_flip: bool = True):
        self.crop_size = int(crop_size)
        self.random_flip = bool(random_flip)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        h, w = image.shape[:2]
        c = self.crop_size
        if h < c or w < c:
            raise ValueError(f"image {h}x{w} is smaller than the crop {c}; pad it first")
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        crop = image[top : top + c, left : left + c]
        if self.random_flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        return {"image": to_float(crop)}


def _transform(
    data_cfg: ml_collections.ConfigDict, task: str, sr_transform: Any, train: bool
) -> grain.transforms.RandomMap:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "sr":
        if sr_transform is None:
            raise ValueError("task='sr' needs sr_transform (e.g. degradations.SRPairTransform)")
        if not hasattr(sr_transform, "random_map"):
            raise TypeError(f"sr_transform must be a grain RandomMap, got {type(sr_transform)}")
        if not train and hasattr(sr_transform, "for_eval"):
            return sr_transform.for_eval()  # training-only augmentations off
        return sr_transform
    if sr_transform is not None:
        raise ValueError("sr_transform is only used with task='sr'")
    return RandomCropFlip(data_cfg.crop_size, data_cfg.random_flip and train)


def _min_size(data_cfg: ml_collections.ConfigDict) -> int:
    return max(data_cfg.crop_size, data_cfg.min_image_size)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """batch_size / process_count; ValueError if it does not divide."""
    if process_count <= 0:
        raise ValueError(f"process_count must be positive, got {process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch_size {global_batch_size} is not divisible by "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


def make_source(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
    """The source named by `data.source` for split "train" or "eval": an image source
    (`sources.make_source`) or a source of aligned pairs (`paired.make_paired_source`)."""
    if data_cfg.source in PAIRED_SOURCES:
        return make_paired_source(data_cfg, split)
    if data_cfg.prompts == "captions":
        return CaptionedFolderSource(sources.folder_of(data_cfg, split))
    return sources.make_source(data_cfg, split)


def _with_prompts(transform, source, dropout: float):
    """`transform` carrying a captioned source's "prompt_embeds" through (with `dropout`)."""
    if not getattr(source, "prompts", False):
        return transform
    return WithPrompt(transform, dropout, source.empty_embedding)


def make_sr_transform(
    data_cfg: ml_collections.ConfigDict, degradation_cfg: ml_collections.ConfigDict
) -> grain.transforms.RandomMap:
    """The transform that makes SR records: aligned crops of given pairs for a paired source
    (the degradation section is then not used), else the on-the-fly degradation."""
    if data_cfg.source in PAIRED_SOURCES:
        logger.info(
            "data.source=%r: training and evaluation pairs are crops of the given LR/HR pairs; "
            "the degradation section is not used to make them",
            data_cfg.source,
        )
        return PairedCrop(data_cfg.crop_size, data_cfg.scale, data_cfg.random_flip)
    return SRPairTransform(degradation_cfg, data_cfg.crop_size)


def _nonempty_source(data_cfg, split: str, source=None):
    """`source`, or the config's source of `split` ("train" | "eval"); an empty one is an error."""
    if source is None:
        source = make_source(data_cfg, split)
    if len(source) == 0:
        kind = "training" if split == "train" else "evaluation"
        raise ValueError(f"{kind} source {source!r} is empty")
    return source


def _records(ds: grain.MapDataset, data_cfg, source, transform) -> grain.MapDataset:
    """Source items -> what `transform` reads: pairs as they are for `PairedCrop`, the HR of a
    pair or a padded image for the others. `PairedCrop` on images, or an SR transform that would
    ignore a pair's LR (degrading its HR instead), is an error."""
    paired = getattr(source, "paired", False)
    if isinstance(transform, PairedCrop) != paired and not isinstance(transform, RandomCropFlip):
        raise ValueError(
            f"source {source!r} and transform {transform!r} do not fit: paired sources make SR "
            "records with PairedCrop (make_sr_transform), image sources with the degradation"
        )
    if isinstance(transform, PairedCrop):
        return ds
    if paired:
        ds = ds.map(HighResolutionOnly())
    return ds.map(PadToRecord(_min_size(data_cfg)))


def build_train_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    task: str = "pretrain",
    sr_transform: grain.transforms.RandomMap | None = None,
    process_index: int = 0,
    process_count: int = 1,
    source: ImageSource | None = None,
) -> grain.MapDataset:
    """Infinite MapDataset of this process's training batches (see the module docstring).

    pretrain: {"image": (B_local, C, C, 3)} float32 in [-1, 1]. sr: whatever `sr_transform`
    returns per record ({"image", "lq", "cond"} for SRPairTransform), stacked over B_local.
    `source` overrides the one named by the config (tests, custom data).
    """
    validate_data_config(data_cfg)
    batch = local_batch_size(data_cfg.batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    transform = _transform(data_cfg, task, sr_transform, train=True)
    source = _nonempty_source(data_cfg, "train", source)
    n = len(source)

    ds = grain.MapDataset.source(source)
    reps = math.ceil(data_cfg.min_records_per_epoch / n)
    if reps > 1:
        ds = ds.repeat(reps, reseed_each_epoch=False)
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=derive_seed(data_cfg.seed, _SHUFFLE))
    ds = ds.repeat(None)  # reseed_each_epoch: the shuffle above changes every epoch.
    ds = _records(ds, data_cfg, source, transform)
    transform = _with_prompts(transform, source, data_cfg.prompt_dropout)
    ds = ds.random_map(transform, seed=derive_seed(data_cfg.seed, _TRAIN_TRANSFORM))
    ds = ds.batch(batch, drop_remainder=True)
    return ds[process_index::process_count]


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker: one OpenCV thread per worker (the workers are the parallelism)."""
    del worker_index, worker_count
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)


def make_train_iterator(
    dataset: grain.MapDataset,
    num_workers: int = 0,
    prefetch: int = 4,
    *,
    read_threads: int = 2,
) -> grain.DatasetIterator:
    """A checkpointable iterator over `dataset`.

    get_state() returns a small JSON-serialisable dict; set_state() on a fresh iterator over the
    same dataset (same config, process and num_workers) resumes bit-identically. num_workers > 0
    moves loading into grain worker processes (mp_prefetch); the batches are the same as with
    num_workers=0, but the state layout differs, so resume with the same num_workers.
    """
    if num_workers < 0 or prefetch < 0 or read_threads < 0:
        raise ValueError(
            f"num_workers, prefetch, read_threads must be >= 0, got "
            f"{num_workers}, {prefetch}, {read_threads}"
        )
    # grain wants at least one buffered element per reading thread.
    read = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads)
    )
    it_ds = dataset.to_iter_dataset(read)
    if num_workers > 0:
        # grain reads its absl flags when starting workers; outside absl.app.run (notebooks,
        # tests) they are unparsed, so accept their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)
            ),
            worker_init_fn=_init_worker,
        )
    return iter(it_ds)


def make_eval_set(
    data_cfg: ml_collections.ConfigDict,
    *,
    task: str = "pretrain",
    sr_transform: grain.transforms.RandomMap | None = None,
    num_crops: int | None = None,
    seed: int | None = None,
    source: ImageSource | None = None,
) -> dict[str, np.ndarray]:
    """A fixed set of evaluation crops from the eval split, identical on every call and host.

    Crop i comes from eval image i mod N (so the images are used evenly), with its own random
    crop (no flip) or SR degradation drawn from (seed, i). Defaults: data.num_eval_crops and
    data.eval_seed. Returns arrays stacked over crops, e.g. {"image": (num_crops, C, C, 3)}.
    """
    validate_data_config(data_cfg)
    num_crops = data_cfg.num_eval_crops if num_crops is None else num_crops
    seed = data_cfg.eval_seed if seed is None else seed
    if num_crops <= 0:
        raise ValueError(f"num_crops must be positive, got {num_crops}")
    transform = _transform(data_cfg, task, sr_transform, train=False)
    source = _nonempty_source(data_cfg, "eval", source)
    n = len(source)
    ds = grain.MapDataset.source(source).repeat(math.ceil(num_crops / n), reseed_each_epoch=False)
    ds = _records(ds, data_cfg, source, transform)
    transform = _with_prompts(transform, source, 0.0)
    ds = ds.random_map(transform, seed=derive_seed(seed, _EVAL_TRANSFORM))
    records = [ds[i] for i in range(num_crops)]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}
