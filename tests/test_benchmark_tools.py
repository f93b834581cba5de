"""The benchmark scripts' own arithmetic (the timings themselves are measured, not tested)."""

from __future__ import annotations

import pytest

from benchmarks.profile_step import op_category, per_step_categories


def test_op_categories_strip_numeric_suffixes_only():
    assert op_category("ynn_fusion.319") == "ynn_fusion"
    assert op_category("add_divide_fusion.7") == "add_divide_fusion"
    assert op_category("copy") == "copy"
    assert op_category("transpose_copy_fusion.18 (thunk)") == "transpose_copy_fusion"


def test_profile_sums_xla_ops_per_step_and_drops_host_events():
    events = [
        {"ph": "X", "name": "ynn_fusion.1", "dur": 3000},  # microseconds
        {"ph": "X", "name": "ynn_fusion.2", "dur": 1000},
        {"ph": "X", "name": "copy.5", "dur": 500},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},  # host bookkeeping
        {"ph": "X", "name": "$common.py:93 time_calls", "dur": 9e6},  # Python frame
        {"ph": "i", "name": "ynn_fusion.3", "dur": 7000},  # not a complete event
    ]
    cats = per_step_categories(events, steps=2)
    assert list(cats) == ["ynn_fusion", "copy"]  # most time first
    assert cats["ynn_fusion"]["ms"] == pytest.approx(2.0)  # 4 ms over 2 steps
    assert cats["ynn_fusion"]["count"] == pytest.approx(1.0)
    assert cats["copy"]["ms"] == pytest.approx(0.25)
