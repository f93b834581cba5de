"""Value checks shared by every config section's validator (and the command line).

Each raises a ValueError or TypeError whose message names the full key (`data.crop_size`), the
value and what was expected, before anything loads or compiles.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def close_matches(key: str, valid: Iterable[str]) -> list[str]:
    """Up to three valid names close to a mistyped `key`."""
    return difflib.get_close_matches(key, sorted(valid), n=3)


def unknown_key_message(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """'unknown config key 'data.crop_sise'; did you mean data.crop_size?'"""
    close = close_matches(key, valid)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return f"unknown config key {prefix + key!r}{hint}"


def check_keys(cfg: Mapping, ref: Mapping, prefix: str = "", *, missing: bool = True) -> None:
    """Unknown keys of `cfg` (with close matches) and, if `missing`, keys of `ref` that `cfg`
    lacks are errors; nested sections are checked recursively. `prefix`: "data." etc."""
    for key in cfg.keys():
        if key not in ref:
            raise ValueError(unknown_key_message(key, ref.keys(), prefix))
    if missing:
        absent = sorted(set(ref.keys()) - set(cfg.keys()))
        if absent:
            raise ValueError(f"config is missing key(s) {[prefix + k for k in absent]}")
    for key in cfg.keys():
        if _is_section(ref[key]):
            if not _is_section(cfg[key]):
                raise TypeError(f"{prefix}{key} must be a config section, got {cfg[key]!r}")
            check_keys(cfg[key], ref[key], f"{prefix}{key}.", missing=missing)


def _is_section(x: Any) -> bool:
    return hasattr(x, "keys") and hasattr(x, "__getitem__")


def _get(cfg: Mapping, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def number(cfg: Mapping, key: str, lo: float = -float("inf"), hi: float = float("inf"), *,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False,
           prefix: str = "") -> None:
    """`cfg[key]` (dotted keys reach into sub-sections) is a number (an int if `integer`) in the
    interval from `lo` to `hi`, each end closed unless `lo_open` / `hi_open`."""
    value = _get(cfg, key)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{prefix}{key} must be {'an int' if integer else 'a number'}, "
                        f"got {value!r}")
    if value != value or (value <= lo if lo_open else value < lo) or (
            value >= hi if hi_open else value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{prefix}{key} must be in {interval}, got {value!r}")


def choice(cfg: Mapping, key: str, valid: Iterable, *, prefix: str = "") -> None:
    """`cfg[key]` is one of `valid`."""
    value, valid = _get(cfg, key), tuple(valid)
    if value not in valid:
        raise ValueError(f"{prefix}{key} must be one of {valid}, got {value!r}")


def boolean(cfg: Mapping, key: str, *, prefix: str = "") -> None:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise TypeError(f"{prefix}{key} must be a bool, got {value!r}")


def positive_ints(cfg: Mapping, key: str, *, prefix: str = "", distinct: bool = False) -> None:
    """`cfg[key]` is a non-empty tuple of positive ints (a single int is accepted)."""
    value = _get(cfg, key)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    bad = any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
              for v in values)
    if not values or bad or (distinct and len(set(values)) != len(values)):
        what = "distinct positive integers" if distinct else "positive integers"
        raise ValueError(f"{prefix}{key} must be {what}, got {value!r}")


def subset(cfg: Mapping, key: str, valid: Iterable, *, prefix: str = "",
           allow_empty: bool = False) -> None:
    """`cfg[key]` is a tuple of distinct values from `valid` (non-empty unless allowed)."""
    value, valid = tuple(_get(cfg, key)), tuple(valid)
    if (not value and not allow_empty) or len(set(value)) != len(value) or set(value) - set(
            valid):
        raise ValueError(f"{prefix}{key} must be a tuple of distinct values from {valid}, "
                         f"got {value!r}")
