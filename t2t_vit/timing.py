"""Timing loops, latency statistics, peak memory and the one-process-per-case benchmark driver.

Every benchmark in the project times through :func:`time_calls` and summarises with
:func:`latency_stats`; benchmarks whose cases must not share a memory high-water mark run each case
in a fresh Python process through :func:`run_case_in_subprocess`, which stops the child when the
parent is stopped (Ctrl-C, SIGTERM) and, on Linux, when the parent dies.

Peak memory has one definition (:class:`PeakMemory`): on a GPU, ``torch.cuda.max_memory_allocated``
during the measured calls; on a CPU, the process's peak resident set size (``ru_maxrss``) at the end,
and its growth over the resident set just before the measured calls.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import T2TError

__all__ = ["time_calls", "time_interleaved", "latency_stats", "PeakMemory", "run_case_in_subprocess",
           "child_process_kwargs", "run_child", "load_average"]


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, min_iters: int = 3, min_time_s: float = 1.0,
               max_iters: int = 10_000, sync: Callable[[], Any] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per ``fn()`` call: ``warmup`` untimed calls, then at least ``min_iters`` calls and
    ``min_time_s`` seconds (at most ``max_iters``). ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    after every call so the clock sees finished work."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = clock()
    while len(times) < max_iters and (len(times) < min_iters or clock() - start < min_time_s):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 2, min_iters: int = 5,
                     min_time_s: float = 3.0, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, timed in ``rounds`` interleaved rounds: every round times each
    function for ``min_time_s / rounds`` seconds (at least one call; ``min_iters`` calls over all rounds),
    in an order rotated by one each round. A machine whose speed drifts during the run (turbo, a neighbour
    on shared cores) then slows every function alike, so their ratios stay fair; timed one after another,
    the drift would land on whichever function ran at the time."""
    labels = list(fns)
    for label in labels:
        for _ in range(warmup):
            fns[label]()
    per_round = max(1, math.ceil(min_iters / rounds))
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label] += time_calls(fns[label], warmup=0, min_iters=per_round, min_time_s=min_time_s / rounds,
                                       clock=clock)
    return times


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """min/max/mean/median/p90/p95/p99 in milliseconds of per-call times in seconds."""
    if not seconds:
        raise ValueError("no timings")
    ms = sorted(float(s) * 1e3 for s in seconds)
    return {"min": ms[0], "max": ms[-1], "mean": statistics.fmean(ms), "median": statistics.median(ms),
            "p90": _percentile(ms, 90), "p95": _percentile(ms, 95), "p99": _percentile(ms, 99)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of the calls made inside ``with PeakMemory(device) as m:`` (see the module docstring).

    After the block: ``m.peak_mib`` (GPU: max allocated; CPU: process peak RSS), ``m.growth_mib`` (above
    what was in use when the block started) and ``m.kind`` (what was measured, for reports).
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self.peak_mib = self.growth_mib = 0.0
        self.kind = "cuda max_memory_allocated" if self.cuda else "process peak RSS"

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        self.peak_mib = peak / 2**20
        self.growth_mib = max(peak - self._base, 0) / 2**20


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------------------------------
# Child processes that stop with their parent
# ----------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this child when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass


def child_process_kwargs() -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child that must not outlive this process."""
    return {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_child(cmd: Sequence[str], *, timeout: float | None = None, **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` for project tools: the child is stopped (SIGTERM, then SIGKILL) when this
    process is interrupted or raises, and gets SIGTERM from the kernel if this process dies."""
    capture = popen.pop("capture_output", False)
    if capture:
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(list(cmd), **child_process_kwargs(), **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_case_in_subprocess(module: str, case: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --case JSON --case-out FILE`` and return the JSON the case wrote.

    The benchmark module's ``main`` handles ``--case`` by running one case and writing its result.

    Raises:
        T2TError: the case failed (its last stderr lines are quoted).
    """
    with tempfile.TemporaryDirectory(prefix="t2t-case-") as tmp:
        result = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", module, "--case", json.dumps(case), "--case-out", str(result)]
        proc = run_child(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            raise T2TError(f"benchmark case {case} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())
