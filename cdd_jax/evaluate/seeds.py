"""Statistics over training seeds: seed means with Student-t intervals, and paired differences.

A table run for several seeds gives, per (method, sampler, steps, metric), one value per seed
(itself a mean over the evaluation images). The seeds are the replicates: the interval of a row
is the two-sided Student-t interval of the mean over its seed values,

    mean +/- t_{(1 + c) / 2, n - 1} * s / sqrt(n),   s = sample standard deviation (ddof = 1),

and a comparison of two rows is the same interval over the per-seed differences (seed i of one
row against seed i of the other: they share the seed's teacher fine-tuning, evaluation crops and
noise), so a difference is *resolved* only when its interval excludes zero. With one seed there is
no interval (NaN) and nothing is resolved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # Two-sided confidence level of every interval over seeds.
INTERVAL_TEXT = "95% Student-t interval over seeds"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the two-sided Student-t interval of the mean of `values`;
    half-width NaN for fewer than two values."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"t_interval needs a non-empty 1-d sequence, got shape {v.shape}")
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan
    q = stats.t.ppf(0.5 + confidence / 2, df=v.size - 1)
    return mean, float(q * v.std(ddof=1) / math.sqrt(v.size))


def aggregate_seeds(per_seed: Mapping[int, Sequence[dict]]) -> list[dict]:
    """One row per (method, sampler, steps, metric), in first-seen order over the seeds:

    value (the mean over the seeds that have the row), ci95 (half-width of its interval; NaN with
    one seed), n_seeds, seeds and seed_values (aligned lists), stderr_images (the mean over seeds
    of the per-image standard error, where the rows carry one), seconds_per_image (mean) and
    n_images.
    """
    groups: dict[tuple, dict] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            key = (r["method"], r["sampler"], r["steps"], r["metric"])
            g = groups.setdefault(key, {"seeds": [], "values": [], "stderr": [], "sec": [],
                                        "n": r["n_images"]})
            if seed in g["seeds"]:
                raise ValueError(f"seed {seed} has two results for {key}")
            g["seeds"].append(int(seed))
            g["values"].append(float(r["value"]))
            g["stderr"].append(float(r.get("stderr", math.nan)))
            g["sec"].append(float(r["seconds_per_image"]))
    out = []
    for (method, sampler, steps, metric), g in groups.items():
        mean, half = t_interval(g["values"])
        out.append(dict(method=method, sampler=sampler, steps=steps, metric=metric, value=mean,
                        ci95=half, n_seeds=len(g["seeds"]), seeds=g["seeds"],
                        seed_values=g["values"], stderr_images=float(np.mean(g["stderr"])),
                        seconds_per_image=float(np.mean(g["sec"])), n_images=g["n"]))
    return out


@dataclasses.dataclass(frozen=True)
class Difference:
    """a - b over the seeds both rows have: mean, interval [lo, hi] (NaN with one seed)."""

    mean: float
    lo: float
    hi: float
    n_seeds: int

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero (NaN bounds: never)."""
        return bool(self.lo > 0 or self.hi < 0)

    def text(self, spec: str = "+.4f", scale: float = 1.0, unit: str = "") -> str:
        m = f"{scale * self.mean:{spec}}{unit}"
        if self.n_seeds < 2:
            return f"{m} (one seed: no interval)"
        return (f"{m} [{scale * self.lo:{spec}}{unit}, {scale * self.hi:{spec}}{unit}] over "
                f"{self.n_seeds} seeds")


def paired_difference(a: dict, b: dict, *, relative: bool = False) -> Difference | None:
    """a - b of two aggregated rows (`aggregate_seeds`), paired by seed, with the t-interval of
    the per-seed differences; `relative`: of a_i / b_i - 1 instead. None if no seed is shared."""
    va = dict(zip(a["seeds"], a["seed_values"], strict=True))
    vb = dict(zip(b["seeds"], b["seed_values"], strict=True))
    shared = [s for s in va if s in vb]
    if not shared:
        return None
    d = [va[s] / vb[s] - 1.0 if relative else va[s] - vb[s] for s in shared]
    mean, half = t_interval(d)
    return Difference(mean, mean - half, mean + half, len(shared))
