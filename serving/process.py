"""A Triton server (:mod:`serving.server`) as a child process: started on free 127.0.0.1 ports in its own
process group, ready when it says so, and always stopped (SIGINT, then SIGKILL to the whole group, so the
``tritonserver`` and Python-backend children go too). Used by the load test and the tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from t2t_vit.errors import T2TError
from t2t_vit.timing import child_process_kwargs

__all__ = ["REPO", "triton_python", "free_ports", "ServerProcess"]

REPO = Path(__file__).resolve().parents[1]


def triton_python() -> Path:
    """The interpreter of ``.venv-triton`` (``make install``), or a clear error."""
    path = Path(os.environ.get("T2T_TRITON_PYTHON", REPO / ".venv-triton" / "bin" / "python"))
    if not path.is_file():
        raise T2TError(f"{path} not found: the Triton server runs in its own virtualenv; create it with "
                       f"`make install-serve` (part of `make install`)")
    return path


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """``with ServerProcess(artifact, ...) as srv:`` -> ``srv.http_url``, ``srv.grpc_url``; stopped on exit."""

    def __init__(self, artifact: str | os.PathLike, *, threads: int = 1, max_batch_size: int = 32,
                 ports: Sequence[int] | None = None, log: str | os.PathLike | None = None,
                 extra: Sequence[str] = (), ready_timeout_s: float = 180.0) -> None:
        self.http_port, self.grpc_port = ports or free_ports(2)
        self.cmd = [str(triton_python()), "-m", "serving.server", "--artifact", str(artifact), "--threads", str(threads),
                    "--max-batch-size", str(max_batch_size), "--http-port", str(self.http_port),
                    "--grpc-port", str(self.grpc_port), *extra]
        self.log = Path(log) if log else None
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> "ServerProcess":
        import tempfile

        if self.log is None:
            self.log = Path(tempfile.mkstemp(prefix="triton-server-", suffix=".log")[1])
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, **child_process_kwargs())
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if "serving.server: ready" in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        tail = "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-8:])
        self.stop()
        raise T2TError(f"the Triton server did not become ready (exit {self.proc.returncode}); log {self.log}:\n{tail}")

    def cpu_by_process(self) -> dict[str, float] | None:
        """CPU seconds (user + system) used so far by the server's live processes, summed per command name:
        its process group (``tritonserver``, the Python-backend stubs, the runner's ``python``); None where
        /proc is missing."""
        if self.proc is None or not Path("/proc/self/stat").is_file():
            return None
        ticks, total = os.sysconf("SC_CLK_TCK"), {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue  # a process that ended while being read
            comm, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 1:].split()
            if int(fields[2]) == self.proc.pid:  # field 5 of stat: the process group id
                total[comm] = total.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def cpu_seconds(self) -> float | None:
        """The server's CPU seconds so far, all its processes (:meth:`cpu_by_process`)."""
        by = self.cpu_by_process()
        return None if by is None else sum(by.values())

    def kill(self) -> None:
        """SIGKILL the whole process group at once (the crash case)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (stubs), even after a clean exit
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
