"""One report format for every tool: a header, JSON + Markdown (+ an optional PNG), written atomically.

Every JSON report starts with the same header (:func:`report_header`)::

    {"tool": "export.to_onnx", "command": "python -m export.to_onnx --model ...",
     "created_utc": "2026-11-30T09:00:00+00:00", "host": {cpu, cores, gpu, versions, load average}, ...}

and accuracy numbers are percentages everywhere (``top1``, ``top5``, ``top1_agreement``; see
:mod:`t2t_vit.metrics`). :func:`write_report` writes ``<stem>.json``, ``<stem>.md`` and, when a figure is
given, ``<stem>.png``.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from .env import host_info
from .files import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["HEADER_KEYS", "report_header", "command_line", "write_report", "markdown_table", "json_safe",
           "host_line", "pyplot"]

HEADER_KEYS = ("tool", "command", "created_utc", "host")


def command_line(tool: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <tool> <args>`` as typed (``argv`` None: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", tool, *args])


def report_header(tool: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The keys every JSON report starts with: tool, command, UTC time, host (hardware, versions, load)."""
    return {
        "tool": tool,
        "command": command_line(tool, argv),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
    }


def host_line(host: dict[str, Any]) -> str:
    """One Markdown line naming the machine, the versions and how busy the CPU was."""
    gpu = (host.get("gpu") or {}).get("name") if isinstance(host.get("gpu"), dict) else host.get("gpu")
    load = host.get("load_average")
    busy = load is not None and load[0] > (host.get("cpu_cores_usable") or host.get("cpu_cores") or 1)
    return (f"{host.get('cpu')} ({host.get('cpu_cores_usable')} cores usable), GPU: {gpu or 'none'}; "
            f"torch {host.get('torch')}, onnxruntime {host.get('onnxruntime')}, onnx {host.get('onnx')}"
            + (f"; load average {load[0]:.2f}" if load is not None else "")
            + (" (other work shared the CPU: timings are pessimistic)" if busy else ""))


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no such numbers), tuples -> lists, Paths -> str, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(stem: str | os.PathLike, report: dict[str, Any], markdown: str, figure: Any = None,
                 dpi: int = 110) -> list[Path]:
    """``<stem>.json`` (the report), ``<stem>.md`` and, with a matplotlib ``figure``, ``<stem>.png``.

    The figure is closed after saving. Every file is written atomically; returns the paths written.
    """
    stem = Path(stem)
    missing = [k for k in HEADER_KEYS if k not in report]
    if missing:
        raise ValueError(f"report lacks the header keys {missing}: build it on report_header()")
    paths = [atomic_write_json(stem.with_name(stem.name + ".json"), json_safe(report)),
             atomic_write_text(stem.with_name(stem.name + ".md"), markdown if markdown.endswith("\n") else markdown + "\n")]
    if figure is not None:
        import matplotlib.pyplot as plt

        png = stem.with_name(stem.name + ".png")
        atomic_write(png, lambda f: figure.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
        plt.close(figure)
        paths.append(png)
    return paths


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, for report figures (imported on first use: matplotlib
    is heavy and only reports need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A Markdown table; floats get 2 decimals (3 significant digits below 1), strings are written as they
    are (format a number into a string for other precision). ``right``: indices of right-aligned columns."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if not math.isfinite(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1 and v != 0 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
