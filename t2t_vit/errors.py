"""The two kinds of expected failure every stage raises, and how commands report them.

* :class:`T2TError` - bad input or an unmet requirement (missing or corrupt file, wrong checkpoint, no
  TensorRT, full disk): the message says how to fix it; a command prints it as one line and exits 2.
* :class:`ThresholdMissed` - the run finished and wrote its reports, but a quality threshold failed
  (export validation, int8 accuracy drop, parity): exit code 1.

Every stage's own error class derives from :class:`T2TError` (and, where older code caught them so, from
``ValueError`` or ``RuntimeError`` too). Anything else that escapes a command is a bug and keeps its
traceback. :mod:`t2t_vit.cli` turns these into exit codes.
"""
from __future__ import annotations

__all__ = ["T2TError", "ThresholdMissed", "Interrupted"]


class T2TError(Exception):
    """An expected failure whose message says what to do about it (exit code 2)."""


class ThresholdMissed(T2TError):
    """A quality threshold was missed; the outputs and reports were written (exit code 1)."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so ``finally`` blocks stop children and clean up."""
