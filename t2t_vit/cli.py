"""One command-line contract for every stage.

* Shared flags, declared once: stage flags (``--model --checkpoint --weights --img-size --out``,
  :func:`add_stage_args`) and run flags (``--batch-size --workers --threads --no-progress``,
  :func:`add_run_args`). "None means default": an unset flag never overrides the registry or the
  checkpoint.
* Counts that must be >= 1 (``--batch-size``, ``--limit``: :class:`PositiveInt`, :func:`add_limit_arg`) are
  checked while parsing: one line naming the flag and its make variable, exit 2, before anything is
  written. ``--limit`` left out means every image; 0 is refused, not read as "all".
* One list syntax: comma-separated (``--batches 1,8,32``, ``--backends onnxruntime-cpu,pytorch``), which
  passes through ``make`` variables without quoting (:func:`comma_list`).
* Exit codes (:func:`run_command`): 0 ok; 1 a quality threshold was missed (the reports were written);
  2 bad input or an error, reported as one line that says what to do: a :class:`~t2t_vit.errors.T2TError`,
  a full disk, a permission problem, or an interrupt (Ctrl-C, SIGTERM, SIGHUP). Anything else is a bug
  and keeps its traceback.
* Thread counts (:func:`resolve_threads`): ``--threads auto`` (the default) uses the cores that are idle
  when the command starts. OpenMP threads that outnumber the free cores spin against each other: on a
  2-core machine with one other busy process, two threads ran several times slower than one.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .artifacts import default_out
from .errors import Interrupted, T2TError, ThresholdMissed
from .files import OUT_HINT

__all__ = [
    "EXIT_OK",
    "EXIT_THRESHOLD",
    "EXIT_ERROR",
    "comma_list",
    "add_stage_args",
    "add_run_args",
    "add_limit_arg",
    "PositiveInt",
    "resolve_out",
    "resolve_threads",
    "fit_workers",
    "once_per_line",
    "apply_threads",
    "idle_cores",
    "install_signal_handlers",
    "run_command",
]

EXIT_OK, EXIT_THRESHOLD, EXIT_ERROR = 0, 1, 2


def comma_list(item: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """argparse ``type`` for comma-separated lists: ``"1,8, 32"`` -> ``[1, 8, 32]`` (empty items dropped)."""

    def parse(text: str) -> list[Any]:
        out = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(item(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not a valid "
                                                 f"{getattr(item, '__name__', 'value')}") from None
        return out

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"
    return parse


def add_stage_args(p: argparse.ArgumentParser, *, model_required: bool = True, checkpoint_help: str | None = None,
                   out_help: str | None = None, img_size_help: str | None = None, weights: bool = True) -> None:
    """``--model --checkpoint [--weights] --img-size --out``, the flags every stage shares."""
    g = p.add_argument_group("model and artifacts")
    g.add_argument("--model", required=model_required, default=None if model_required else "t2t_vit_7",
                   help="registered model name, e.g. t2t_vit_7 (python -c 'import t2t_vit; print(t2t_vit.ARCHS)')")
    g.add_argument("--checkpoint", default=None,
                   help=checkpoint_help or "weights (.pth/.pth.tar/.safetensors); without it: random weights, loudly")
    if weights:
        g.add_argument("--weights", choices=("ema", "model"), default=None,
                       help="EMA or raw weights of a training checkpoint (default: the one the checkpoint records "
                            "as better, else EMA)")
    g.add_argument("--img-size", type=int, default=None,
                   help=img_size_help or "input size (default: the checkpoint's, else the registry's)")
    g.add_argument("--out", default=None, help=out_help or "artifact folder (default artifacts/<model>)")


class PositiveInt(argparse.Action):
    """A flag that takes a whole number >= 1, checked while parsing: anything else is one line,
    ``<prog>: error: --flag (make VAR=) must be ...``, and exit 2, before the command writes a file.

    ``variable`` (``add_argument(..., variable="BATCH_SIZE")``) is the make variable that sets the flag.
    """

    def __init__(self, option_strings, dest, variable: str | None = None, unset: str | None = None, **kwargs):
        self.variable = variable
        self.unset = unset  # what leaving the flag out means, for the message
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            n = int(str(values).strip())
        except ValueError:
            n = 0
        if n < 1:
            via = f" (make {self.variable}=)" if self.variable else ""
            parser.exit(EXIT_ERROR, f"{parser.prog}: error: {option_string}{via} must be a whole number >= 1, "
                                    f"got {values!r}; {self.help_hint()}\n")
        setattr(namespace, self.dest, n)

    def help_hint(self) -> str:
        if self.unset:
            return f"leave it out for {self.unset}"
        return "leave it out for the default" if self.default is None else f"the default is {self.default}"


def add_run_args(p: argparse.ArgumentParser, *, batch_size: int | None = 32, workers: int | None = 2,
                 threads: bool = True, progress: bool = True) -> None:
    """``--batch-size --workers --threads --no-progress`` (each only where the stage has it)."""
    g = p.add_argument_group("run")
    if batch_size is not None:
        g.add_argument("--batch-size", action=PositiveInt, variable="BATCH_SIZE", default=batch_size,
                       help=f"images per batch, >= 1 (default {batch_size}; make BATCH_SIZE=)")
    if workers is not None:
        g.add_argument("--workers", type=int, default=workers,
                       help=f"image decoding processes (default {workers}; 0 decodes in the main process)")
    if threads:
        g.add_argument("--threads", default="auto",
                       help="intra-op threads of PyTorch and ONNX Runtime: a number, or auto (default) = the cores "
                            "idle at start, so a busy machine does not make OpenMP threads spin")
    if progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_limit_arg(g: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str = "--limit",
                  variable: str | None = "LIMIT", what: str = "images") -> None:
    """``--limit N``: a deterministic class-balanced subset of N >= 1 images; left out (make: ``LIMIT=``
    empty), every image. 0 and negative numbers are refused (one line, exit 2) rather than read as "all"."""
    via = f"; make {variable}=N, empty = all" if variable else ""
    g.add_argument(flag, action=PositiveInt, variable=variable, default=None, unset=f"all {what.split(' (')[0]}",
                   help=f"class-balanced subset of N >= 1 {what} (default: all{via})")


def resolve_out(args: argparse.Namespace) -> Path:
    return Path(args.out) if getattr(args, "out", None) else default_out(args.model)


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------
def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_workers_noted: set[tuple[int, int]] = set()  # (asked, used): each cap is noted once per process


def fit_workers(requested: int, flag: str = "--workers") -> int:
    """Image-decoding processes capped at the usable cores, with one note when capped.

    More DataLoader workers than cores only compete for them, and torch warns about it at every loader
    it starts (three times per training run); the recipes' ``workers: 8`` is for an 8-GPU node.
    """
    cores = _usable_cores()
    if requested <= cores:
        return requested
    if (requested, cores) not in _workers_noted:
        _workers_noted.add((requested, cores))
        logging.getLogger("t2t_vit").warning("%s %d is more than the %d usable cores: using %d decoding processes",
                                             flag, requested, cores, cores)
    return cores


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def idle_cores(sample_s: float = 0.25) -> float:
    """How many cores were idle over a short sample (from /proc/stat); all of them where unreadable."""
    cores = _usable_cores()
    a = _cpu_times()
    if a is None:
        return float(cores)
    time.sleep(sample_s)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return float(cores)
    frac = (b[0] - a[0]) / (b[1] - a[1])
    total = os.cpu_count() or cores  # /proc/stat counts every online CPU
    return max(0.0, min(float(cores), frac * total))


def resolve_threads(spec: int | str | None) -> int:
    """A thread count from ``--threads``: a positive number, or ``auto``/None = the idle cores (at least 1).

    Raises:
        T2TError: not a positive number or ``auto``.
    """
    if spec is None or str(spec).strip().lower() in ("", "auto"):
        return max(1, min(_usable_cores(), int(idle_cores() + 0.5)))
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise T2TError(f"--threads must be a positive number or auto, got {spec!r}")
    return n


def apply_threads(spec: int | str | None) -> int:
    """Resolve ``--threads`` and apply it to PyTorch; returns the count (pass it to ONNX Runtime too)."""
    import torch

    n = resolve_threads(spec)
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------------
# Console output of libraries
# ----------------------------------------------------------------------------------------------------
class _OnceWriter(io.TextIOBase):
    """A text stream that passes each distinct line on the first time and counts the repeats."""

    def __init__(self, target: IO[str]) -> None:
        self.target, self.seen, self.repeats, self._partial = target, set(), 0, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if line in self.seen:
                self.repeats += 1
            else:
                self.seen.add(line)
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def once_per_line(what: str) -> Iterator[None]:
    """Print each distinct line a library prints to stdout once, and one line counting the repeats.

    ONNX Runtime's calibrators print "Collecting tensor data and making histogram ..." per stride (32
    times for 1024 images) with ``print``, which no logging level silences. ``what`` names the library
    in the count line.
    """
    writer = _OnceWriter(sys.stdout)
    try:
        with contextlib.redirect_stdout(writer):
            yield
    finally:  # also on an error: the last line and the count are not lost
        if writer._partial:
            writer.write("\n")
        if writer.repeats:
            print(f"({what}: {writer.repeats} repeated lines not shown)", flush=True)


# ----------------------------------------------------------------------------------------------------
# Exit codes and signals
# ----------------------------------------------------------------------------------------------------
def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`~t2t_vit.errors.Interrupted` (like Ctrl-C raises KeyboardInterrupt),
    so ``finally`` blocks run: child processes are stopped, locks released, temporary files removed."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, _raise_interrupted)
        except (ValueError, OSError):  # not the main thread (in-process tests): leave the defaults
            pass


_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def run_command(fn: Callable[[], int | None], tool: str = "", out_hint: str = OUT_HINT) -> int:
    """Run a command's body and turn expected failures into one line on stderr and an exit code.

    ``fn`` returns 0 (or None) on success, or raises :class:`~t2t_vit.errors.ThresholdMissed` (exit 1),
    :class:`~t2t_vit.errors.T2TError` (exit 2), ``OSError`` for a full disk or a permission problem
    (exit 2), ``KeyboardInterrupt``/:class:`~t2t_vit.errors.Interrupted` (exit 2). Other exceptions
    propagate with their traceback: they are bugs. ``out_hint`` names the make variable and flag of the
    output folder in the full-disk message (training: ``RUN_DIR=... / --out``).
    """
    prefix = f"{tool}: " if tool else ""
    install_signal_handlers()
    try:
        rc = fn()
    except ThresholdMissed as e:
        print(f"{prefix}FAIL: {e}", file=sys.stderr)
        return EXIT_THRESHOLD
    except T2TError as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Interrupted) as e:
        what = f"{e}" if isinstance(e, Interrupted) else "Ctrl-C"
        print(f"{prefix}interrupted ({what}): stopped; files already written are complete, nothing is "
              f"half-written; run the command again to redo (training: --resume last.pth)", file=sys.stderr)
        return EXIT_ERROR
    except FileNotFoundError as e:
        print(f"{prefix}error: file not found: {e.filename or e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        if e.errno in _DISK_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            print(f"{prefix}error: {_DISK_ERRNOS[e.errno]}{where} while writing; free space or pick a writable "
                  f"folder ({out_hint}) and run again (no partial file was left)", file=sys.stderr)
            return EXIT_ERROR
        raise
    return int(rc or 0)


def parse_and_run(get_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int | None],
                  tool: str, argv: list[str] | None = None) -> int:
    """A command's ``main``: parse ``argv`` with ``get_parser()``, then ``run(args)`` under :func:`run_command`."""
    args = get_parser().parse_args(argv)
    return run_command(lambda: run(args), tool)
