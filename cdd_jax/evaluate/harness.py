"""Evaluation harness: run super-resolution methods on one held-out set, time them, score them.

Every method sees the same batches and, batch for batch, the same random key (common random
numbers), so differences between rows come from the methods, not from the draw. A method is a
`MethodSpec`: a display name, the sampler it uses, its number of network evaluations, and
`fn(cond, lq, rng) -> pred`, all images NHWC in [-1, 1]:

    cond  [B, H, W, 3]   the low-quality input upsampled (bicubic) to the output size
    lq    [B, h, w, 3]   the low-quality input itself (H = scale * h)
    pred  [B, H, W, 3]   the method's reconstruction

The evaluation set is a dict of numpy arrays with keys "cond", "lq" and the ground truth
(`target_key`, default "image", as in the batches `data.degradations.SRPairTransform` makes),
all in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from cdd_jax.console import note
from cdd_jax.evaluate.metrics import MetricSuite, area_downsample

MethodFn = Callable[[np.ndarray, np.ndarray, jax.Array], Any]

ROW_KEYS = (
    "method",
    "sampler",
    "steps",
    "metric",
    "value",
    "stderr",
    "seconds_per_image",
    "n_images",
)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row group of the results table.

    Attributes:
      name: method label in the table (e.g. "codi", "finetune", "bicubic").
      sampler: sampler label (e.g. "ddim", "dpm++2m", "prev", "none").
      steps: number of network evaluations per image (0 for non-neural baselines).
      fn: `fn(cond, lq, rng) -> pred`; may return a jax or numpy array.
      prompts: fn reads per-example prompts: its cond is {"image": cond, "prompt_embeds":
        [B, T, D]} from the evaluation set's "prompt_embeds" (a captioned dataset's).
    """

    name: str
    sampler: str
    steps: int
    fn: MethodFn
    prompts: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 0:
            raise ValueError(
                f"MethodSpec {self.name!r}: steps must be an int >= 0, got {self.steps!r}"
            )
        if not callable(self.fn):
            raise TypeError(f"MethodSpec {self.name!r}: fn must be callable, got {type(self.fn)}")


class EvalResults(list):
    """The result rows (a plain `list[dict]`, JSON-serialisable as is), plus side outputs.

    Attributes:
      predictions: {method key: first `keep_predictions` predictions, [n, H, W, 3] in [-1, 1]}.
      per_image: {method key: {metric: per-image values, shape (n_images,)}}.
    """

    def __init__(self, rows=(), predictions=None, per_image=None):
        super().__init__(rows)
        self.predictions: dict[str, np.ndarray] = dict(predictions or {})
        self.per_image: dict[str, dict[str, np.ndarray]] = dict(per_image or {})


def bicubic_method() -> MethodSpec:
    """The bicubic-upsampling baseline: the condition already is the bicubic upsampling of lq."""
    return MethodSpec(name="bicubic", sampler="none", steps=0, fn=lambda cond, lq, rng: cond)


def downsample_consistency(pred, lq, scale: int) -> dict[str, np.ndarray]:
    """How well a reconstruction reproduces its own input's low frequencies.

    Area-downsamples `pred` [B, H, W, 3] by `scale` to lq's size and compares it with `lq`
    [B, H/scale, W/scale, 3] (both in [-1, 1]). Returns per-image arrays:
      lr_mse:  mean squared error on the [-1, 1] scale;
      lr_psnr: PSNR in dB on the [0, 1] scale (= -10 log10(lr_mse / 4)).
    A conditional SR model that ignores its condition scores badly here whatever its loss says.
    When lq was made by area-downsampling the ground truth, the ground truth scores exactly 0;
    under other degradations (blur, noise, JPEG) the ground truth's own score is the floor.
    """
    pred = np.asarray(pred, np.float32)
    lq = np.asarray(lq, np.float32)
    if pred.ndim != 4 or lq.ndim != 4:
        raise ValueError(
            f"downsample_consistency: expected NHWC arrays, got {pred.shape}, {lq.shape}"
        )
    expected = (pred.shape[0], pred.shape[1] // scale, pred.shape[2] // scale, pred.shape[3])
    if lq.shape != expected or pred.shape[1] % scale or pred.shape[2] % scale:
        raise ValueError(
            f"downsample_consistency: pred {pred.shape} downsampled by {scale} does not match "
            f"lq {lq.shape}"
        )
    mse = np.mean(np.square(area_downsample(pred, scale) - lq), axis=(1, 2, 3), dtype=np.float64)
    with np.errstate(divide="ignore"):
        lr_psnr = -10.0 * np.log10(mse / 4.0)
    return {"lr_mse": mse, "lr_psnr": lr_psnr}


def timing_device() -> str:
    """A short description of the device timings were taken on, for reports."""
    devices = jax.devices()
    return f"{devices[0].platform}: {devices[0].device_kind} (x{len(devices)})"


def _check_eval_set(eval_set: Mapping[str, np.ndarray], target_key: str) -> int:
    """Validates keys and shapes of the evaluation set; returns the super-resolution scale."""
    for key in ("cond", "lq", target_key):
        if key not in eval_set:
            raise ValueError(f"eval_set lacks key {key!r}; it has {sorted(eval_set)}")
    hq, cond, lq = (np.shape(eval_set[k]) for k in (target_key, "cond", "lq"))
    if len(hq) != 4 or hq[-1] != 3:
        raise ValueError(f"eval_set[{target_key!r}] must be NHWC RGB, got shape {hq}")
    if cond != hq:
        raise ValueError(f"eval_set['cond'] shape {cond} differs from {target_key!r} shape {hq}")
    if len(lq) != 4 or lq[0] != hq[0] or lq[-1] != 3 or hq[1] % lq[1] or hq[2] % lq[2]:
        raise ValueError(f"eval_set['lq'] shape {lq} is not a downscaled {hq}")
    scale = hq[1] // lq[1]
    if hq[2] // lq[2] != scale:
        raise ValueError(f"eval_set: unequal scales for height and width: {hq} vs {lq}")
    if hq[0] == 0:
        raise ValueError("eval_set is empty")
    return scale


def _batch(x: np.ndarray, start: int, size: int) -> np.ndarray:
    """x[start:start+size], padded to `size` by repeating the last item (fixed jitted shapes)."""
    b = x[start : start + size]
    if b.shape[0] < size:
        b = np.concatenate([b, np.repeat(b[-1:], size - b.shape[0], axis=0)], axis=0)
    return b


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    n = values.shape[0]
    mean = float(np.mean(values))
    if n < 2 or not np.all(np.isfinite(values)):
        return mean, float("nan")
    return mean, float(np.std(values, ddof=1) / np.sqrt(n))


def evaluate_methods(
    methods: Mapping[str, MethodSpec],
    eval_set: Mapping[str, np.ndarray],
    metrics: MetricSuite,
    *,
    batch_size: int,
    rng_seed: int,
    target_key: str = "image",
    keep_predictions: int = 8,
    consistency: bool = True,
) -> EvalResults:
    """Runs, times and scores every method on `eval_set`.

    Timing: each method is first called once on the first batch (compilation, not timed); then
    every batch is timed from the call to `jax.block_until_ready` of its output. The last batch
    is padded to `batch_size` so no new shape compiles inside the timed region; the padded work
    counts towards the time (seconds_per_image = total timed seconds / number of real images).
    Metrics are computed after timing, on the unpadded predictions.

    Returns `EvalResults`: a list of rows {method, sampler, steps, metric, value (mean over
    images), stderr (standard error of that mean), seconds_per_image, n_images}, one per method
    and metric (plus "lr_mse" / "lr_psnr" from `downsample_consistency` when `consistency`),
    with `.predictions` and `.per_image` keyed like `methods`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_methods: batch_size must be a positive int, got {batch_size!r}")
    _check_methods(methods)
    scale = _check_eval_set(eval_set, target_key)
    data = {k: np.asarray(eval_set[k], np.float32) for k in ("cond", "lq")}
    data["hq"] = np.asarray(eval_set[target_key], np.float32)
    if "prompt_embeds" in eval_set:
        data["prompt_embeds"] = np.asarray(eval_set["prompt_embeds"], np.float32)
    for key, spec in methods.items():
        if spec.prompts and "prompt_embeds" not in data:
            raise ValueError(f"method {key!r} reads per-example prompts but the evaluation set "
                             f"has no 'prompt_embeds'; it has {sorted(eval_set)}")
    n = data["hq"].shape[0]
    results = EvalResults()
    for key, spec in methods.items():
        per_image, kept, seconds = _run_method(
            key, spec, data, metrics, batch_size=batch_size, base_key=jax.random.key(rng_seed),
            scale=scale if consistency else None, keep_predictions=keep_predictions)
        results.per_image[key] = per_image
        if kept:
            results.predictions[key] = np.concatenate(kept)[:keep_predictions]
        for name, v in per_image.items():
            mean, stderr = _mean_and_stderr(v)
            results.append(dict(method=spec.name, sampler=spec.sampler, steps=int(spec.steps),
                                metric=name, value=mean, stderr=stderr,
                                seconds_per_image=seconds / n, n_images=n))
        note("evaluated %s (%s, %d steps): %s; %.4f s/image", key, spec.sampler,
                     spec.steps, ", ".join(f"{k}={np.mean(v):.4f}" for k, v in per_image.items()),
                     seconds / n)
    return results


def _check_methods(methods: Mapping[str, MethodSpec]) -> None:
    if not methods:
        raise ValueError("evaluate_methods: no methods given")
    seen = {}
    for key, spec in methods.items():
        if not isinstance(spec, MethodSpec):
            raise TypeError(f"methods[{key!r}] must be a MethodSpec, got {type(spec)}")
        ident = (spec.name, spec.sampler, int(spec.steps))
        if ident in seen:
            raise ValueError(f"methods {seen[ident]!r} and {key!r} share (name, sampler, steps)")
        seen[ident] = key


def _run_method(key: str, spec: MethodSpec, data: dict[str, np.ndarray], metrics: MetricSuite, *,
                batch_size: int, base_key: jax.Array, scale: int | None, keep_predictions: int):
    """One method over every batch: (per-image scores, kept predictions, timed seconds)."""
    cond, lq, hq = data["cond"], data["lq"], data["hq"]
    n = hq.shape[0]
    starts = list(range(0, n, batch_size))

    def cond_batch(start):
        c = _batch(cond, start, batch_size)
        if not spec.prompts:
            return c
        return {"image": c, "prompt_embeds": _batch(data["prompt_embeds"], start, batch_size)}

    # Warm-up (compilation) on the first batch, with a key no timed batch uses.
    warm_key = jax.random.fold_in(base_key, len(starts))
    jax.block_until_ready(spec.fn(cond_batch(0), _batch(lq, 0, batch_size), warm_key))
    seconds = 0.0
    values: dict[str, list[np.ndarray]] = {}
    kept = []
    for i, start in enumerate(starts):
        c, low = cond_batch(start), _batch(lq, start, batch_size)
        t0 = time.perf_counter()
        out = jax.block_until_ready(spec.fn(c, low, jax.random.fold_in(base_key, i)))
        seconds += time.perf_counter() - t0
        real = min(batch_size, n - start)
        pred = np.asarray(out, np.float32)
        want = (batch_size, *cond.shape[1:])
        if pred.shape != want:
            raise ValueError(f"method {key!r} returned shape {pred.shape}, expected {want}")
        pred = pred[:real]
        if not np.all(np.isfinite(pred)):
            raise ValueError(f"method {key!r} returned non-finite values in batch {i}")
        scores = metrics(pred, hq[start : start + real])
        if scale is not None:
            scores.update(downsample_consistency(pred, lq[start : start + real], scale))
        for name, v in scores.items():
            values.setdefault(name, []).append(v)
        if sum(k.shape[0] for k in kept) < keep_predictions:
            kept.append(pred)
    return {name: np.concatenate(v) for name, v in values.items()}, kept, seconds
