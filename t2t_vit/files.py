"""Atomic result files: written to a temporary file in the destination folder and moved into place
with :func:`os.replace`, so an interrupted run never leaves a half-written checkpoint, ONNX graph,
engine, sidecar or report behind (a reader sees the old file or the new one, never a prefix).
Every stage writes its outputs through these functions.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_save_onnx"]


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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (checkpoints, cached calibration tensors)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_onnx(model_proto: Any, path: str | os.PathLike) -> Path:
    """Serialize an ONNX ModelProto atomically (graphs under protobuf's 2 GiB, i.e. every T2T-ViT variant)."""
    return atomic_write(path, lambda f: f.write(model_proto.SerializeToString()))
