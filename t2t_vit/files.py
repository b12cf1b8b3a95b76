"""Files every stage writes and reads: atomic writes, sha256, and one writer per output folder.

* Atomic writes: a temporary file in the destination folder, moved into place with :func:`os.replace`,
  so an interrupted run never leaves a half-written checkpoint, ONNX graph, engine, sidecar or report
  behind (a reader sees the old file or the new one, never a prefix). Temporary files carry the
  writer's pid; one left by a killed writer (SIGKILL skips every cleanup) is removed by
  :func:`remove_stale_temp_files`, which :class:`OutputLock` runs when it takes a folder.
* :func:`file_sha256`: the one content hash (checkpoints in ONNX metadata, engines in sidecars, ONNX
  files in calibration caches).
* :class:`OutputLock`: two commands writing the same output folder would overwrite each other's
  reports; the second one is refused with the first one's pid and command.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from .errors import T2TError

__all__ = ["ensure_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_save_onnx", "file_sha256", "remove_stale_temp_files", "OutputLock", "OutputBusyError"]

_TMP = re.compile(r"^\..+\.pid(?P<pid>\d+)\.[^.]+\.tmp$")


OUT_HINT = "OUT=... / --out"


def ensure_dir(folder: str | os.PathLike, error: type[T2TError] = T2TError, out_hint: str = OUT_HINT) -> Path:
    """Create an output folder (and its parents); raises ``error`` (a T2TError) with the fix when impossible.

    ``out_hint`` names the make variable and flag that choose the folder (training: ``RUN_DIR=... / --out``).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the output folder {folder}: {e.strerror or e}; pass a writable folder "
                    f"({out_hint})") from e
    if not os.access(folder, os.W_OK):
        raise error(f"output folder {folder} is not writable; pass a writable folder ({out_hint})")
    return folder


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno is not None and (e.filename is None or str(e.filename) == tmp):  # name the user's file, not the temp
            e.filename = str(path)
        raise
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
    """``torch.save`` atomically (checkpoints, cached calibration tensors).

    PyTorch's zip writer turns a full disk into a ``RuntimeError`` ("unexpected pos ..."); when the
    destination's file system is (nearly) full at that moment, it is reported as the ``OSError(ENOSPC)``
    it is, so commands say "no space left" instead of printing a traceback.
    """
    import shutil

    import torch

    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:
        if shutil.disk_usage(Path(path).parent).free < 16 * 2**20:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise


def atomic_save_onnx(model_proto: Any, path: str | os.PathLike) -> Path:
    """Serialize an ONNX ModelProto atomically (graphs under protobuf's 2 GiB, i.e. every T2T-ViT variant)."""
    return atomic_write(path, lambda f: f.write(model_proto.SerializeToString()))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of atomic writes whose writer process no longer exists; returns them."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid"))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


class OutputBusyError(T2TError):
    """Another command is writing to the same output folder."""


class OutputLock:
    """An exclusive, advisory lock on an output folder for the lifetime of one command.

    The lock is ``fcntl.flock`` on the folder itself, which the kernel releases when the process dies, so
    a killed command never leaves the folder locked. While held, ``<folder>/.t2t-owner`` names the
    owner's pid and command line for the message a second command gets; it is removed on exit.
    Entering also removes temporary files left by killed writers. Re-entrant within a process (a stage
    that runs another stage in-process, such as calibration exporting its fp32 graph, keeps one lock).
    """

    OWNER = ".t2t-owner"
    _held: dict[str, int] = {}  # resolved folder -> nesting depth, in this process

    def __init__(self, folder: str | os.PathLike, what: str = "", out_hint: str = OUT_HINT) -> None:
        self.folder = Path(folder)
        self.what = what or " ".join(sys.argv)
        self.out_hint = out_hint
        self._fd: int | None = None
        self._key = ""

    def __enter__(self) -> "OutputLock":
        import fcntl

        ensure_dir(self.folder, out_hint=self.out_hint)
        self._key = str(self.folder.resolve())
        if self._key in OutputLock._held:
            OutputLock._held[self._key] += 1
            return self
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                owner = (self.folder / self.OWNER).read_text().strip()
            except OSError:
                owner = "another process"
            raise OutputBusyError(
                f"{self.folder} is in use by {owner or 'another process'}; wait for it to finish, or write "
                f"elsewhere ({self.out_hint})") from None
        self._fd = fd
        OutputLock._held[self._key] = 1
        (self.folder / self.OWNER).write_text(f"pid {os.getpid()}: {self.what}\n")
        remove_stale_temp_files(self.folder)
        return self

    def __exit__(self, *exc: Any) -> None:
        OutputLock._held[self._key] -= 1
        if OutputLock._held[self._key] > 0:
            return
        del OutputLock._held[self._key]
        if self._fd is not None:
            (self.folder / self.OWNER).unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
