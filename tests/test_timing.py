"""t2t_vit.timing: latency statistics against numpy, the timing loop, peak memory, the per-case subprocess driver."""
from __future__ import annotations

import os

import numpy as np
import pytest

from t2t_vit.errors import T2TError
from t2t_vit.timing import PeakMemory, latency_stats, run_case_in_subprocess, time_calls


def test_latency_stats_against_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        secs = rng.uniform(0.001, 0.01, size=n)
        st = latency_stats(list(secs))
        ms = secs * 1e3
        assert st["min"] == pytest.approx(ms.min()) and st["max"] == pytest.approx(ms.max())
        assert st["mean"] == pytest.approx(ms.mean()) and st["median"] == pytest.approx(np.median(ms))
        for p in (90, 95, 99):
            assert st[f"p{p}"] == pytest.approx(np.percentile(ms, p))
    with pytest.raises(ValueError):
        latency_stats([])



def test_time_calls_warmup_min_iters_and_min_time():
    t = [0.0]
    calls = []

    def clock():
        return t[0]

    def fn():
        calls.append(1)
        t[0] += 0.25

    times = time_calls(fn, warmup=2, min_iters=2, min_time_s=1.0, clock=clock)
    assert times == [0.25] * 4 and len(calls) == 6  # 2 warm-up calls are not timed
    assert len(time_calls(fn, warmup=0, min_iters=3, min_time_s=0.0, clock=clock)) == 3
    assert len(time_calls(fn, warmup=0, min_iters=1, min_time_s=100.0, max_iters=5, clock=clock)) == 5


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] += 1
    assert big.kind == "process peak RSS"
    assert big.peak_mib >= small.peak_mib
    assert big.growth_mib >= 48  # the block above the resident set at the start (allocator slack aside)


def test_subprocess_case_driver_returns_json_and_reports_failures():
    out = run_case_in_subprocess("tests.timing_case", {"value": 21})
    assert out["value"] == 21 and out["double"] == 42
    assert out["pid"] != os.getpid() and out["parent"] == os.getpid()  # a fresh child of this process
    with pytest.raises(T2TError, match="boom"):
        run_case_in_subprocess("tests.timing_case", {"value": -1})
