"""Atomic result files and the hardware/software description that goes into every report and sidecar.

Results are written to a temporary file in the destination folder and moved into place with
:func:`os.replace`, so an interrupted build or benchmark never leaves a half-written engine, sidecar or
report behind (a reader sees the old file or the new one, never a prefix).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from t2t_vit.env import host_info  # noqa: F401  (re-exported: reports and sidecars name their host)

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "host_info"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises, so a failure leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: Any) -> Path:
    """Write a bytes-like object (bytes, memoryview, TensorRT ``IHostMemory``) atomically."""
    return atomic_write(path, lambda f: f.write(memoryview(data)))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
