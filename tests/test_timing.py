"""t2t_vit.timing: latency statistics against numpy, the timing loop, peak memory, the per-case subprocess driver."""
from __future__ import annotations

import os

import numpy as np
import pytest

from t2t_vit.errors import T2TError
from t2t_vit.timing import PeakMemory, latency_stats, run_case_in_subprocess, time_calls, time_interleaved


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


def test_interleaved_timing_spreads_a_drifting_machine_over_every_function():
    """A machine that slows down steadily (each call 1% slower than the last): two functions doing the same
    work, timed one after the other, differ by the drift; interleaved, their medians agree within a round's
    worth of drift, and each round visits them in a rotated order."""
    t, speed, order = [0.0], [1.0], []

    def clock():
        return t[0]

    def work(label):
        def fn():
            order.append(label)
            t[0] += 0.1 * speed[0]
            speed[0] *= 1.01
        return fn

    fns = {"a": work("a"), "b": work("b")}
    a = time_calls(fns["a"], warmup=0, min_iters=1, min_time_s=1.0, clock=clock)
    b = time_calls(fns["b"], warmup=0, min_iters=1, min_time_s=1.0, clock=clock)
    assert np.median(b) / np.median(a) > 1.08  # sequential: the drift reads as a 10% difference
    order.clear()
    times = time_interleaved(fns, rounds=10, warmup=1, min_iters=1, min_time_s=2.0, clock=clock)
    assert order[:2] == ["a", "b"]  # warm-up, untimed
    timed = order[2:]
    runs = [x for i, x in enumerate(timed) if i == 0 or x != timed[i - 1]]
    # Rounds a|b, b|a, a|b, ...: a rotated order joins each round's last function to the next round's first,
    # so 10 rounds make 11 runs of one function (in a fixed order they would make 20).
    assert runs[0] == "a" and len(runs) == 11
    assert len(times["a"]) >= 10 and len(times["b"]) >= 10
    assert abs(np.median(times["b"]) / np.median(times["a"]) - 1) < 0.03


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
