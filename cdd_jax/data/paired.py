"""Aligned LR/HR image pairs: sources, their checks, and the aligned crop that makes training
records, an alternative to degrading HR images on the fly (`data.source` "paired_folders" or
"tfds_paired").

A source item is {"image": HR uint8 (H, W, 3), "lq": LR uint8 (H / scale, W / scale, 3)}.
`PairedCrop` turns it into exactly the record `degradations.SRPairTransform` makes ({"image",
"lq", "cond"}, float32 in [-1, 1], cond = bicubic upsampling of lq), so nothing downstream
changes.

Checks when a source opens:
- names: folders are matched by relative path without extension; names in only one folder are
  counted and logged (first few named); no match at all is an error;
- sizes (every folder pair, from the file headers): HR must be exactly `scale` x LR in both
  sides, else a ValueError naming the pair and both sizes; pairs whose HR is smaller than the
  crop are skipped and counted. TFDS pairs are size-checked as they are read;
- alignment (`align_check_pairs` pairs, evenly spread): the HR is area-downsampled by `scale`
  and compared with the LR (grey, normalised cross-correlation, NCC) at integer LR shifts up to
  `MAX_SHIFT`; a pair whose best shift is not zero, or whose NCC at zero shift is below
  `MIN_NCC` (an unrelated or swapped image), is a ValueError naming it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from typing import Any

import grain
import numpy as np
from PIL import Image

from cdd_jax.data.degradations.transform import sr_example
from cdd_jax.data.images import IMAGE_EXTENSIONS, decode_image, to_rgb_uint8
from cdd_jax.data.sources import find_image_key, open_tfds

logger = logging.getLogger(__name__)

MAX_SHIFT = 2  # LR pixels searched each way by the alignment check.
MIN_NCC = 0.5  # Below this at zero shift the LR does not look like its HR at all.
_WINDOW = 256  # The alignment check compares a central window of at most this many LR pixels.
_ORIENTATION_SWAPS = (5, 6, 7, 8)  # EXIF orientations that swap width and height.

# ----------------------------------------------------------------------------- matching files


def image_files_by_name(folder: str) -> dict[str, str]:
    """{relative path without extension: path} of the image files under `folder` (recursive).
    Two files with the same name and different extensions are an error naming both."""
    if not os.path.isdir(folder):
        raise ValueError(f"paired image folder {folder!r} does not exist or is not a directory")
    found: dict[str, str] = {}
    for dirpath, _, names in os.walk(folder):
        for name in sorted(names):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            key = os.path.splitext(os.path.relpath(path, folder))[0]
            if key in found:
                raise ValueError(f"two images named {key!r} in {folder!r}: "
                                 f"{found[key]} and {path}; which one pairs is ambiguous")
            found[key] = path
    return found


def match_pairs(lr_dir: str, hr_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(name, lr_path, hr_path)] sorted by name, [unmatched "folder/name"])."""
    lr, hr = image_files_by_name(lr_dir), image_files_by_name(hr_dir)
    pairs = [(k, lr[k], hr[k]) for k in sorted(lr.keys() & hr.keys())]
    unmatched = [os.path.join(lr_dir, k) for k in sorted(lr.keys() - hr.keys())]
    unmatched += [os.path.join(hr_dir, k) for k in sorted(hr.keys() - lr.keys())]
    if unmatched:
        logger.warning("paired folders %r / %r: %d image(s) without a partner skipped (%d "
                       "pairs); first: %s", lr_dir, hr_dir, len(unmatched), len(pairs),
                       ", ".join(unmatched[:3]))
    if not pairs:
        raise ValueError(f"no image name occurs in both {lr_dir!r} and {hr_dir!r} "
                         f"({len(unmatched)} unmatched file(s)); pairs are matched by file "
                         f"name without extension")
    return pairs, unmatched


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, after its EXIF orientation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                w, h = img.size
                orientation = img.getexif().get(0x0112, 1)
        except Exception as e:  # PIL raises many types for malformed files.
            raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
    return (w, h) if orientation in _ORIENTATION_SWAPS else (h, w)


def check_scale(name: str, lr_size, hr_size, scale: int) -> None:
    """HR must be exactly `scale` x LR in both sides; ValueError naming the pair otherwise."""
    if tuple(hr_size) != (lr_size[0] * scale, lr_size[1] * scale):
        raise ValueError(f"pair {name!r}: HR is {hr_size[0]}x{hr_size[1]} (HxW) and LR is "
                         f"{lr_size[0]}x{lr_size[1]}; the HR must be exactly {scale}x the LR "
                         "in both sides (data.scale)")


def holdout(names: list[str], fraction: float) -> set[str]:
    """The held-out names: the max(1, round(fraction * n)) names whose SHA-1 comes first, so
    the split depends on the names only (not on their order or on other files)."""
    if len(names) < 2:
        raise ValueError(f"{len(names)} pair(s): cannot hold out evaluation pairs and still "
                         "train; set data.eval_lr_dir and data.eval_hr_dir")
    k = min(len(names) - 1, max(1, round(fraction * len(names))))
    return set(sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:k])


# ----------------------------------------------------------------------------- alignment


def area_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """float64 mean over scale x scale blocks of an (H, W[, C]) array (H, W multiples of
    scale)."""
    h, w = image.shape[:2]
    blocks = image.reshape(h // scale, scale, w // scale, scale, *image.shape[2:])
    return blocks.astype(np.float64).mean(axis=(1, 3))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def alignment(lr: np.ndarray, hr: np.ndarray, scale: int, max_shift: int = MAX_SHIFT):
    """(NCC at zero shift, best (dy, dx) in LR pixels, its NCC) of the area-downsampled HR
    against the LR, in grey, on a central window of at most _WINDOW LR pixels a side."""
    m = max_shift
    down = area_downsample(hr.mean(axis=2), scale)
    grey = lr.astype(np.float64).mean(axis=2)
    h, w = grey.shape
    if h <= 2 * m + 2 or w <= 2 * m + 2:
        return float("nan"), (0, 0), float("nan")
    top, left = max(m, (h - _WINDOW) // 2), max(m, (w - _WINDOW) // 2)
    bottom, right = min(h - m, top + _WINDOW), min(w - m, left + _WINDOW)
    ref = grey[top:bottom, left:right]
    scores = {(dy, dx): _ncc(ref, down[top + dy:bottom + dy, left + dx:right + dx])
              for dy in range(-m, m + 1) for dx in range(-m, m + 1)}
    best = max(scores, key=lambda s: (scores[s], s == (0, 0)))
    return scores[(0, 0)], best, scores[best]


def check_alignment(name: str, lr: np.ndarray, hr: np.ndarray, scale: int) -> None:
    """ValueError naming the pair if it looks shifted or unrelated (see the module docstring).
    A flat window (NCC undefined) passes."""
    ncc0, shift, best = alignment(lr, hr, scale)
    if ncc0 != ncc0:
        return
    hint = "; set data.align_check_pairs=0 to train on it anyway"
    if ncc0 < MIN_NCC:
        raise ValueError(f"pair {name!r} looks unrelated: the area-downsampled HR and the LR "
                         f"correlate at {ncc0:.3f} (< {MIN_NCC}); a wrong or swapped file?{hint}")
    if shift != (0, 0) and best > ncc0 + 1e-6:
        raise ValueError(f"pair {name!r} looks misaligned: the area-downsampled HR matches the "
                         f"LR best when shifted by (dy, dx) = {shift} LR pixels (NCC {best:.4f}; "
                         f"{ncc0:.4f} unshifted){hint}")


def check_some_pairs(source: Any, num_pairs: int) -> None:
    """Decodes `num_pairs` pairs of `source`, evenly spread, and checks their alignment."""
    n = len(source)
    if num_pairs <= 0:
        return
    for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, num_pairs))}):
        item = source[i]
        check_alignment(source.name_of(i), item["lq"], item["image"], source.scale)


# ----------------------------------------------------------------------------- sources


class PairedFolderSource:
    """Pairs of image files matched by name in two folders; items {"image": HR, "lq": LR}.

    subset: "all", or "train" / "eval" with `eval_fraction` held out (see `holdout`). The
    folders are scanned once (headers only); pairs are decoded on access.
    """

    paired = True

    def __init__(self, lr_dir: str, hr_dir: str, *, scale: int, crop_size: int,
                 subset: str = "all", eval_fraction: float = 0.1, align_check_pairs: int = 8):
        if subset not in ("all", "train", "eval"):
            raise ValueError(f"subset must be 'all', 'train' or 'eval', got {subset!r}")
        self.lr_dir, self.hr_dir = os.fspath(lr_dir), os.fspath(hr_dir)
        self.scale, self.subset = int(scale), subset
        pairs, self.unmatched = match_pairs(self.lr_dir, self.hr_dir)
        if subset != "all":
            held = holdout([p[0] for p in pairs], eval_fraction)
            pairs = [p for p in pairs if (p[0] in held) == (subset == "eval")]
        self.pairs, self.too_small = [], []
        for name, lr_path, hr_path in pairs:
            lr_size, hr_size = header_size(lr_path), header_size(hr_path)
            check_scale(f"{name}: {lr_path}, {hr_path}", lr_size, hr_size, self.scale)
            if min(hr_size) < crop_size:
                self.too_small.append(name)
            else:
                self.pairs.append((name, lr_path, hr_path))
        if self.too_small:
            logger.warning("%r: %d pair(s) with an HR side below the crop %d skipped; first: %s",
                           self, len(self.too_small), crop_size, ", ".join(self.too_small[:3]))
        if not self.pairs:
            raise ValueError(f"no usable pairs in {self.lr_dir!r} / {self.hr_dir!r} "
                             f"(subset {subset!r}; {len(self.too_small)} smaller than the crop)")
        check_some_pairs(self, align_check_pairs)
        logger.info("%r: %d pairs", self, len(self.pairs))

    def name_of(self, index: int) -> str:
        name, lr_path, hr_path = self.pairs[index]
        return f"{name}: {lr_path}, {hr_path}"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        name, lr_path, hr_path = self.pairs[int(index)]
        lr, hr = decode_image(lr_path), decode_image(hr_path)
        check_scale(self.name_of(int(index)), lr.shape[:2], hr.shape[:2], self.scale)
        return {"image": hr, "lq": lr}

    def __repr__(self) -> str:
        return (f"PairedFolderSource(lr_dir={self.lr_dir!r}, hr_dir={self.hr_dir!r}, "
                f"subset={self.subset!r})")


class TfdsPairedSource:
    """Two Image features (LR and HR) of one split of a prepared TFDS dataset, read with
    `tfds.data_source` (no TensorFlow, never downloads). Sizes are checked as records are read
    (reading every record up front would decode the whole dataset); alignment as for folders."""

    paired = True

    def __init__(self, name: str, split: str, data_dir: str | None, *, lr_feature: str,
                 hr_feature: str, scale: int, align_check_pairs: int = 8):
        self.name, self.split, self.scale = name, split, int(scale)
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.lr_feature, self.hr_feature = lr_feature, hr_feature
        features = open_tfds(name, self.data_dir).info.features
        for key in (lr_feature, hr_feature):
            find_image_key(features, key, name)
        self._source = None
        if len(self._open()) == 0:
            raise ValueError(f"split {split!r} of TFDS dataset {name!r} is empty")
        check_some_pairs(self, align_check_pairs)

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(self.name, split=self.split,
                                            data_dir=self.data_dir, download=False)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def name_of(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._open()[int(index)]
        lr, hr = to_rgb_uint8(record[self.lr_feature]), to_rgb_uint8(record[self.hr_feature])
        check_scale(self.name_of(int(index)), lr.shape[:2], hr.shape[:2], self.scale)
        return {"image": hr, "lq": lr}

    def __repr__(self) -> str:
        return (f"TfdsPairedSource(name={self.name!r}, split={self.split!r}, "
                f"lr_feature={self.lr_feature!r}, hr_feature={self.hr_feature!r})")


def make_paired_source(data_cfg, split: str):
    """The paired source of `data_cfg` for split "train" or "eval"."""
    if data_cfg.source == "tfds_paired":
        tfds_split = data_cfg.tfds_split if split == "train" else data_cfg.tfds_eval_split
        return TfdsPairedSource(data_cfg.tfds_name, tfds_split, data_cfg.tfds_data_dir,
                                lr_feature=data_cfg.lr_feature, hr_feature=data_cfg.hr_feature,
                                scale=data_cfg.scale,
                                align_check_pairs=data_cfg.align_check_pairs)
    separate = split == "eval" and data_cfg.eval_lr_dir
    lr_dir = data_cfg.eval_lr_dir if separate else data_cfg.lr_dir
    hr_dir = data_cfg.eval_hr_dir if separate else data_cfg.hr_dir
    subset = "all" if (data_cfg.eval_lr_dir or data_cfg.eval_hr_dir) else split
    return PairedFolderSource(lr_dir, hr_dir, scale=data_cfg.scale,
                              crop_size=data_cfg.crop_size, subset=subset,
                              eval_fraction=data_cfg.eval_fraction,
                              align_check_pairs=data_cfg.align_check_pairs)


# ----------------------------------------------------------------------------- crops


class PairedCrop(grain.transforms.RandomMap):
    """{"image": HR uint8, "lq": LR uint8} -> {"image", "lq", "cond"} as `SRPairTransform`.

    The LR crop (crop_size / scale) is placed uniformly, the HR crop at scale x its position, so
    the HR crop's top-left corner is a multiple of scale; both are flipped together
    (horizontally, probability 1/2 if random_flip). cond = cv2 bicubic of the LR crop to
    crop_size, clipped to [0, 1]; everything mapped to [-1, 1] as float32. The HR is the target
    as given (no USM sharpening).
    """

    def __init__(self, crop_size: int, scale: int, random_flip: bool = True):
        if crop_size % scale:
            raise ValueError(f"crop_size {crop_size} is not a multiple of scale {scale}")
        self.crop_size, self.scale, self.random_flip = int(crop_size), int(scale), random_flip

    def __repr__(self) -> str:
        return (f"PairedCrop(crop_size={self.crop_size}, scale={self.scale}, "
                f"random_flip={self.random_flip})")

    def for_eval(self) -> PairedCrop:
        """The same crops without the flip (training-only augmentation)."""
        return PairedCrop(self.crop_size, self.scale, random_flip=False)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        hr, lr, s, crop = element["image"], element["lq"], self.scale, self.crop_size
        check_scale("record", lr.shape[:2], hr.shape[:2], s)
        c = crop // s
        h, w = lr.shape[:2]
        if h < c or w < c:
            raise ValueError(f"LR image {h}x{w} is smaller than the LR crop {c}")
        top, left = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
        lq = lr[top:top + c, left:left + c]
        gt = hr[top * s:(top + c) * s, left * s:(left + c) * s]
        if self.random_flip and rng.random() < 0.5:
            lq, gt = lq[:, ::-1], gt[:, ::-1]
        lq = np.ascontiguousarray(lq).astype(np.float32) / np.float32(255.0)
        gt = gt.astype(np.float32) / np.float32(255.0)
        return sr_example(gt, lq, crop)
