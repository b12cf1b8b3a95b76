"""Parse trtexec's performance summary into plain data (``python -m engines.trtexec_log LOG``).

Accepts the summaries of TensorRT 8.2 through 11 (the format of the trtexec documentation, "trtexec" in
NVIDIA's TensorRT developer guide): lines after ``=== Performance summary ===`` with or without the
``[MM/DD/YYYY-HH:MM:SS] [I] `` prefix, one (``percentile(99%)``, 8.2-8.4) or three (90/95/99) percentiles,
8.2's extra ``End-to-End Host Latency`` line, numbers in scientific notation, and ``[W]`` advice lines
(kept as warnings). Whatever metrics a summary holds are parsed and every absent one is None (some 8.x
logs have ``Throughput`` and ``GPU Compute Time`` but no ``Latency`` line); a statistics line that cannot
be read is skipped with a warning. Only a log without a summary, or a summary without any metric,
raises :class:`TrtexecLogError` (quoting trtexec's own error lines).

One trtexec "query" is one inference of the whole ``--shapes`` batch, so images/s = qps x batch.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from t2t_vit.cli import run_command
from t2t_vit.errors import T2TError

__all__ = ["TrtexecLogError", "parse_summary", "parse_log_file", "batch_from_command", "version_from_log",
           "get_args_parser", "main"]

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# "[06/01/2022-10:00:00] [I] " (timestamp optional, severity optional) at the start of a line.
_PREFIX = re.compile(r"^\s*(?:\[\d{2}/\d{2}/\d{4}-\d{2}:\d{2}:\d{2}\]\s*)?(?:\[(?P<sev>[A-Z])\]\s?)?")
_SECTION = re.compile(r"^===\s*(?P<title>.*?)\s*===\s*$")
_STAT = re.compile(rf"(?P<key>min|max|mean|median|percentile\((?P<pct>{_NUM})%\))\s*=\s*(?P<val>{_NUM})\s*(?P<unit>ms|us|s)\b")
_STATS_LINE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9 \-/]*?)\s*:\s*(?P<body>min\s*=.*)$")
_THROUGHPUT = re.compile(rf"^Throughput:\s*(?P<val>{_NUM})\s*qps\b")
_TOTAL = re.compile(rf"^(?P<name>Total (?:Host Walltime|GPU Compute Time)):\s*(?P<val>{_NUM})\s*(?P<unit>ms|s)\b")
_TRT_TAG = re.compile(r"\[TensorRT v(?P<v>\d+)\]")
_TRT_LINE = re.compile(r"TensorRT version:\s*(?P<v>\d+(?:\.\d+)+)")
_SCALE_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3}
_SCALE_S = {"s": 1.0, "ms": 1e-3}

# trtexec's metric names -> our JSON keys (unknown stat lines are kept under their snake_case name).
_STAT_KEYS = {
    "latency": "latency_ms",
    "host latency": "latency_ms",
    "end-to-end host latency": "end_to_end_host_latency_ms",
    "enqueue time": "enqueue_ms",
    "h2d latency": "h2d_ms",
    "gpu compute time": "gpu_compute_ms",
    "gpu compute": "gpu_compute_ms",
    "d2h latency": "d2h_ms",
}


class TrtexecLogError(T2TError, ValueError):
    """The log holds no (or a malformed) performance summary; the message says what it found instead."""


def _strip(line: str) -> tuple[str, str]:
    m = _PREFIX.match(line)
    sev = (m.group("sev") or "I") if m else "I"
    return sev, line[m.end():].rstrip() if m else line.rstrip()


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _pct_key(pct: str) -> str:
    value = float(pct)
    return f"p{int(value)}" if value.is_integer() else f"p{value:g}"


def _parse_stats(name: str, body: str) -> dict[str, float | None] | None:
    """The statistics of one line (each one trtexec did not print is None), or None when none can be read."""
    stats: dict[str, float | None] = {"min": None, "max": None, "mean": None, "median": None,
                                      "p90": None, "p95": None, "p99": None}
    found = 0
    for m in _STAT.finditer(body):
        key = _pct_key(m.group("pct")) if m.group("pct") else m.group("key")
        stats[key] = float(m.group("val")) * _SCALE_MS[m.group("unit")]
        found += 1
    return stats if found else None


def batch_from_command(command: str, input_name: str | None = None) -> int | None:
    """The batch of a ``--shapes=input:8x3x224x224`` argument (the first input's first dim)."""
    m = re.search(r"--shapes[= ](\S+)", command)
    if not m:
        return None
    for spec in m.group(1).split(","):
        name, _, dims = spec.rpartition(":")
        if input_name is not None and name.strip("'\"") != input_name:
            continue
        first = dims.split("x")[0]
        if first.isdigit():
            return int(first)
    return None


def version_from_log(text: str) -> str | None:
    """TensorRT version from ``TensorRT version: 10.13.3`` or the ``[TensorRT v101303]`` tag."""
    m = _TRT_LINE.search(text)
    if m:
        return m.group("v")
    m = _TRT_TAG.search(text)
    if not m:
        return None
    n = int(m.group("v"))
    # NV_TENSORRT_VERSION: major*1000 + minor*100 + patch before 10, major*10000 + minor*100 + patch since.
    if n >= 100000:
        return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    return f"{n // 1000}.{n // 100 % 10}.{n % 100}"


def _command_from_log(text: str) -> str | None:
    m = re.search(r"^&&&& (?:RUNNING|PASSED|FAILED) TensorRT\.trtexec \[TensorRT v\d+\] # (?P<cmd>.+)$", text, re.M)
    return m.group("cmd").strip() if m else None


def parse_summary(text: str, batch: int | None = None) -> dict[str, Any]:
    """The performance summary of a trtexec log as a dict.

    Args:
        text: the whole log.
        batch: images per query; None reads it from the ``--shapes`` argument in the log's
            ``&&&& RUNNING`` line (images_per_s is None when neither says).

    Returns:
        ``throughput_qps``, ``images_per_s``, ``latency_ms`` / ``gpu_compute_ms`` / ``enqueue_ms`` /
        ``h2d_ms`` / ``d2h_ms`` (each min/max/mean/median/p90/p95/p99; percentiles trtexec did not
        print are None), ``total_host_walltime_s``, ``total_gpu_compute_s``, ``warnings``,
        ``tensorrt_version``, ``command``, ``batch``, ``percentiles`` (those printed).

    Raises:
        TrtexecLogError: no summary, or a summary without any metric.
    """
    lines = text.splitlines()
    start = None
    for i, raw in enumerate(lines):
        _, line = _strip(raw)
        sec = _SECTION.match(line)
        if sec and sec.group("title").lower() == "performance summary":
            start = i + 1
    if start is None:
        errors = [_strip(l)[1] for l in lines if _strip(l)[0] in ("E", "F") or l.startswith("&&&& FAILED")]
        hint = ("; its errors: " + " | ".join(errors[:5])) if errors else ""
        raise TrtexecLogError(f"no '=== Performance summary ===' section in the log (trtexec did not finish "
                              f"timing){hint}")

    command = _command_from_log(text)
    if batch is None and command:
        batch = batch_from_command(command)
    result: dict[str, Any] = {
        "tensorrt_version": version_from_log(text),
        "command": command,
        "batch": batch,
        "throughput_qps": None,
        "images_per_s": None,
        "latency_ms": None,
        "gpu_compute_ms": None,
        "enqueue_ms": None,
        "h2d_ms": None,
        "d2h_ms": None,
        "total_host_walltime_s": None,
        "total_gpu_compute_s": None,
        "percentiles": [],
        "warnings": [],
    }
    for raw in lines[start:]:
        sev, line = _strip(raw)
        if not line:
            continue
        if _SECTION.match(line) or line.startswith("&&&&"):
            break  # the next section (e.g. verbose metric explanations) or trtexec's exit line
        if sev in ("W", "E"):
            result["warnings"].append(line.strip())
            continue
        if sev not in ("I",):
            continue
        if m := _THROUGHPUT.match(line):
            result["throughput_qps"] = float(m.group("val"))
        elif m := _TOTAL.match(line):
            key = "total_host_walltime_s" if "Walltime" in m.group("name") else "total_gpu_compute_s"
            result[key] = float(m.group("val")) * _SCALE_S[m.group("unit")]
        elif m := _STATS_LINE.match(line):
            name = m.group("name").strip()
            key = _STAT_KEYS.get(name.lower(), _snake(name) + "_ms")
            stats = _parse_stats(name, m.group("body"))
            if stats is None:
                result["warnings"].append(f"unreadable {name!r} statistics line skipped: {m.group('body')!r}")
                continue
            result[key] = stats
    metrics = [k for k, v in result.items() if v is not None and (k.endswith(("_ms", "_s")) or k == "throughput_qps")]
    if not metrics:
        raise TrtexecLogError("the performance summary holds no metric (no Throughput, statistics or Total line); "
                              "is the log truncated?")
    # The percentiles trtexec printed (the same on every statistics line): from Latency, else the first one.
    first = result["latency_ms"] or next((v for k, v in result.items() if k.endswith("_ms") and isinstance(v, dict)),
                                         None)
    if first:
        result["percentiles"] = sorted((k for k, v in first.items() if k.startswith("p") and v is not None),
                                       key=lambda k: float(k[1:]))
    if batch is not None and result["throughput_qps"] is not None:
        result["images_per_s"] = result["throughput_qps"] * batch
    return result


def parse_log_file(path: str | Path, batch: int | None = None) -> dict[str, Any]:
    """:func:`parse_summary` of a saved log, with the file name in any error."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise TrtexecLogError(f"cannot read {path}: {e}") from e
    try:
        out = parse_summary(text, batch=batch)
    except TrtexecLogError as e:
        raise TrtexecLogError(f"{path}: {e}") from e
    return {"log": str(path), **out}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print the performance summary of a saved trtexec log as JSON",
                                add_help=add_help)
    p.add_argument("log", help="trtexec output saved to a file (e.g. trtexec ... 2>&1 | tee run.log)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per query for images/s (default: read from --shapes in the log)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        print(json.dumps(parse_log_file(args.log, batch=args.batch), indent=2))
        return 0

    return run_command(body, "engines.trtexec_log")


if __name__ == "__main__":
    raise SystemExit(main())
