"""Assemble and run trtexec so that TensorRT 10.x and 11.x measure the same thing.

TensorRT 11's trtexec defaults to CUDA graphs, no host<->device transfers and spin wait; 10.x needs
``--useCudaGraph --noDataTransfers --useSpinWait`` for the same measurement (the trtexec section of NVIDIA's
TensorRT documentation lists the defaults of each version).
Both get the engine (``--loadEngine``), one explicit shape per run (``--shapes=input:Nx3xHxW``), the
same warmup/duration/iteration budget, and ``--exportTimes`` for per-query records.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

from t2t_vit.errors import T2TError
from t2t_vit.files import atomic_write_text
from t2t_vit.timing import run_child

from .trt_compat import parse_version
from .trtexec_log import TrtexecLogError, parse_summary, version_from_log

__all__ = ["TrtexecError", "TimingBudget", "SAME_MEASUREMENT_FLAGS_10", "find_trtexec", "trtexec_version",
           "trtexec_command", "run_trtexec"]

# On 10.x these make trtexec measure what 11.x measures by default.
SAME_MEASUREMENT_FLAGS_10 = ("--useCudaGraph", "--noDataTransfers", "--useSpinWait")


class TrtexecError(T2TError, RuntimeError):
    """trtexec is missing or failed; the message says what to do."""


@dataclass(frozen=True)
class TimingBudget:
    """trtexec's timing knobs: warmup (ms), minimum duration (s) and minimum iterations."""

    warmup_ms: int = 500
    duration_s: float = 10.0
    iterations: int = 100


def find_trtexec(path: str | None = None) -> str:
    """The trtexec binary: ``path``, ``$TRTEXEC``, then ``trtexec`` on PATH.

    Raises:
        TrtexecError: not found.
    """
    for candidate in (path, os.environ.get("TRTEXEC"), "trtexec"):
        if not candidate:
            continue
        found = shutil.which(candidate)
        if found:
            return found
    raise TrtexecError("trtexec not found: put TensorRT's bin/ folder on PATH or set TRTEXEC=/path/to/trtexec "
                       "(it ships with NVIDIA's TensorRT tar/deb packages and containers, not with pip)")


def trtexec_version(binary: str, timeout_s: float = 60.0) -> str:
    """TensorRT version of a trtexec binary, from the ``[TensorRT vNNNNNN]`` tag it prints on every run."""
    try:
        proc = run_child([binary, "--help"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TrtexecError(f"cannot run {binary} --help: {e}") from e
    version = version_from_log(proc.stdout + proc.stderr)
    if version is None:
        raise TrtexecError(f"{binary} --help printed no '[TensorRT vNNNN]' tag; is it trtexec?")
    return version


def _dim(value: int) -> str:
    return str(int(value))


def trtexec_command(engine: str | os.PathLike, batch: int, input_shape: Sequence[int], tensorrt_version: str,
                    *, input_name: str = "input", binary: str = "trtexec",
                    budget: TimingBudget = TimingBudget(), export_times: str | os.PathLike | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """The argv of one trtexec timing run of ``engine`` at ``batch``.

    Args:
        engine: a serialized engine (``--loadEngine``).
        batch: images per query; the first dim of ``--shapes``.
        input_shape: the per-image shape ``(C, H, W)``.
        tensorrt_version: of this trtexec (e.g. ``"10.13.3"``): below 11, the flags that make 10.x time
            like 11.x are added.
        input_name: the engine's input tensor.
        budget: warmup / duration / iterations.
        export_times: ``--exportTimes`` JSON path (per-query latencyMs, computeMs, h2dMs, d2hMs).
        extra: more flags, appended last.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    dims = "x".join(_dim(d) for d in (batch, *input_shape))
    cmd = [
        str(binary),
        f"--loadEngine={engine}",
        f"--shapes={input_name}:{dims}",
        f"--warmUp={int(budget.warmup_ms)}",
        f"--duration={budget.duration_s:g}",
        f"--iterations={int(budget.iterations)}",
    ]
    if parse_version(tensorrt_version)[0] < 11:
        cmd += list(SAME_MEASUREMENT_FLAGS_10)
    if export_times is not None:
        cmd.append(f"--exportTimes={export_times}")
    cmd += list(extra)
    return cmd


def run_trtexec(cmd: Sequence[str], log_path: str | os.PathLike, batch: int, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run one trtexec command, save its log, and return the parsed summary (with the command line).

    Raises:
        TrtexecError: trtexec failed or printed no performance summary (the log is kept for reading).
    """
    try:
        proc = run_child(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TrtexecError(f"{shlex.join(cmd)}: {e}") from e
    text = proc.stdout + (("\n" + proc.stderr) if proc.stderr else "")
    atomic_write_text(log_path, text)
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise TrtexecError(f"trtexec exited with {proc.returncode}; log: {log_path}\n{tail}")
    try:
        summary = parse_summary(text, batch=batch)
    except TrtexecLogError as e:
        raise TrtexecError(f"{log_path}: {e}") from e
    summary["command"] = shlex.join(cmd)
    summary["log"] = str(log_path)
    return summary

