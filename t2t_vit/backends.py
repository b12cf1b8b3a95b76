"""The backend vocabulary: one typed spec per inference backend, parsed once from its name.

A backend is a runtime (``pytorch``, ``onnxruntime``, ``tensorrt``) on a device (``cpu``, ``cuda``) at a
precision (``fp32``, ``bf16``, ``fp16``, ``int8``, ``int8-cpu``, ``fp8``), spelled as its runner is named::

    pytorch-<cpu|cuda>-fp32[-compile]      pytorch-<cpu|cuda>-<bf16|fp16>-autocast
    onnxruntime-<cpu|cuda>-<fp32|fp16|int8|int8-cpu|fp8>      tensorrt-<fp32|fp16|int8|fp8>

``onnxruntime-*-fp8`` runs the TensorRT fp8 graph's float8e4m3fn Q/DQ on ONNX Runtime: an emulation
(:attr:`BackendSpec.emulation` says what it models); ``tensorrt-fp8`` needs an SM 8.9+ GPU.

:func:`parse_backend` turns a name into a :class:`BackendSpec` (or one line listing the valid names);
:func:`select_backends` picks specs by name, dash-separated prefix (``onnxruntime-cpu``) or glob
(``onnxruntime-*-int8``). What a spec needs on disk is :meth:`BackendSpec.artifact`; the runner itself is
made in one place, :func:`engines.backends.resolve_backend` (it lives with the TensorRT runner, which this
package may not import).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from .artifacts import ENGINE_PRECISIONS, GRAPH_PRECISIONS, engine_path, onnx_path
from .runners import RunnerError

__all__ = ["RUNTIMES", "DEVICES", "FP8_EMULATION", "BackendSpec", "all_backends", "parse_backend", "select_backends"]

RUNTIMES = ("pytorch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
# PyTorch runs fp32 as is and bf16/fp16 under autocast; the other runtimes run the graph the file holds.
PRECISIONS: dict[str, tuple[str, ...]] = {"pytorch": ("fp32", "bf16", "fp16"), "onnxruntime": GRAPH_PRECISIONS,
                                           "tensorrt": ENGINE_PRECISIONS}
# What ONNX Runtime's run of the fp8 graph is: its QuantizeLinear/DequantizeLinear round every quantized tensor to
# float8e4m3fn exactly as TensorRT's Q does (saturating, nearest even: tests/test_fp8.py checks it), then it multiplies
# in the graph's fp16/fp32. TensorRT's FP8 GEMMs multiply FP8 operands with their own accumulation: not modelled.
FP8_EMULATION = ("emulated: ONNX Runtime rounds the quantized tensors to float8e4m3fn (Q/DQ) and multiplies in "
                 "fp16/fp32; no FP8 GEMM accumulation is modelled")
# The spellings used before there was one vocabulary began with these; they are gone (see _old_name_hint).
_OLD_RUNTIMES = {"ort": "onnxruntime", "trt": "tensorrt", "torch": "pytorch"}


@dataclass(frozen=True)
class BackendSpec:
    """One backend: runtime, device, precision (and ``torch.compile`` for PyTorch fp32)."""

    runtime: str
    device: str
    precision: str
    compile: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise RunnerError(f"backend runtime {self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if self.device not in DEVICES or (self.runtime == "tensorrt" and self.device != "cuda"):
            raise RunnerError(f"backend {self.runtime} device {self.device!r}: use "
                              + ("cuda" if self.runtime == "tensorrt" else " or ".join(DEVICES)))
        if self.precision not in PRECISIONS[self.runtime]:
            raise RunnerError(f"backend {self.runtime} precision {self.precision!r}: use one of "
                              f"{', '.join(PRECISIONS[self.runtime])}")
        if self.compile and (self.runtime != "pytorch" or self.precision != "fp32"):
            raise RunnerError("torch.compile backends are pytorch-<device>-fp32-compile only")

    @property
    def name(self) -> str:
        """The runner name: the one spelling every tool, report and flag uses."""
        if self.runtime == "tensorrt":
            return f"tensorrt-{self.precision}"
        if self.runtime == "onnxruntime":
            return f"onnxruntime-{self.device}-{self.precision}"
        suffix = "-compile" if self.compile else ("" if self.precision == "fp32" else "-autocast")
        return f"pytorch-{self.device}-{self.precision}{suffix}"

    @property
    def emulation(self) -> str:
        """What this backend does not run natively ('' for a native run): ONNX Runtime on the fp8 graph."""
        return FP8_EMULATION if self.runtime == "onnxruntime" and self.precision == "fp8" else ""

    @property
    def family(self) -> str:
        return self.runtime

    def artifact(self, out: str | os.PathLike, model: str) -> Path | None:
        """The file this backend runs under the artifacts folder ``out`` (None for PyTorch)."""
        if self.runtime == "onnxruntime":
            return onnx_path(out, model, self.precision)
        if self.runtime == "tensorrt":
            return engine_path(out, model, self.precision)
        return None

    def __str__(self) -> str:
        return self.name


def all_backends(devices: Iterable[str] = DEVICES, providers: Iterable[str] | None = None) -> list[BackendSpec]:
    """Every backend of the vocabulary (PyTorch on ``devices``, ONNX Runtime on ``providers``, default the
    same), in report order: PyTorch, ONNX Runtime, TensorRT."""
    devices = list(devices)
    providers = devices if providers is None else list(providers)
    specs = [BackendSpec("pytorch", d, p) for d in devices for p in PRECISIONS["pytorch"]]
    specs += [BackendSpec("pytorch", d, "fp32", compile=True) for d in devices]
    specs += [BackendSpec("onnxruntime", d, p) for d in providers for p in GRAPH_PRECISIONS]
    return specs + [BackendSpec("tensorrt", "cuda", p) for p in ENGINE_PRECISIONS]


_BY_NAME = {s.name: s for s in all_backends()}


def _old_name_hint(text: str, candidates: Sequence[str]) -> str:
    """For a pre-vocabulary spelling (``ort-fp16``, ``torch-cuda``, ``pytorch-autocast``): the names it meant."""
    parts = text.split("-")
    if parts[0] not in _OLD_RUNTIMES and text not in ("pytorch-fp32", "pytorch-autocast"):
        return ""
    words = {_OLD_RUNTIMES.get(parts[0], parts[0]), *parts[1:]}

    def plainest(names: Sequence[str]) -> list[str]:  # the fewest extra words: ort-int8 is not int8-cpu
        fits = [n for n in names if words <= set(n.split("-"))]
        fewest = min((len(n.split("-")) for n in fits), default=0)
        return [n for n in fits if len(n.split("-")) == fewest]

    meant, elsewhere = plainest(candidates), ""
    if not meant:
        meant = plainest(list(_BY_NAME))
        elsewhere = f" (not offered here; backends here: {', '.join(candidates)})"
    return (f"the old backend names (ort-*, trt-*, torch-*, pytorch-fp32, pytorch-autocast) are gone; "
            f"use {' or '.join(meant[:4]) if meant else 'a runner name'}{elsewhere}")


def parse_backend(text: str | BackendSpec) -> BackendSpec:
    """The spec a backend name spells, e.g. ``onnxruntime-cpu-int8``.

    Raises:
        RunnerError: not a backend name; one line with the replacement of an old name, or the valid names.
    """
    if isinstance(text, BackendSpec):
        return text
    name = str(text).strip().lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    hint = _old_name_hint(name, list(_BY_NAME))
    raise RunnerError(f"unknown backend {text!r}: {hint or 'use one of ' + ', '.join(_BY_NAME)}")


T = TypeVar("T", str, BackendSpec)


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + "-")


def select_backends(selection: str | Iterable[str] | None, candidates: Sequence[T]) -> list[T]:
    """The candidates a selection picks, in candidate order.

    Args:
        selection: comma-separated selectors (or a list); None, "" or "all" pick every candidate. A selector
            is a backend name (exact: it picks only itself), a dash-separated prefix of names
            (``onnxruntime-cpu``), or a glob (``onnxruntime-*-int8``).
        candidates: the backends the tool offers for this run (specs or names, available or not).

    Raises:
        RunnerError: a selector that matches no candidate (the message lists the names, or the
            replacement of an old name).
    """
    if selection is None or (isinstance(selection, str) and selection.strip() in ("", "all")):
        return list(candidates)
    names = [str(c) for c in candidates]
    items = selection.split(",") if isinstance(selection, str) else list(selection)
    picked: set[str] = set()
    for sel in (i.strip().lower() for i in items if i and i.strip()):
        hits = [sel] if sel in names else [n for n in names if _matches(sel, n)]
        if not hits:
            hint = _old_name_hint(sel, names)
            raise RunnerError(f"unknown backend {sel!r}; " + (hint or f"backends here: {', '.join(names)} (a prefix "
                              f"such as 'onnxruntime' or 'tensorrt' selects a family; comma-separate several)"))
        picked.update(hits)
    return [c for c in candidates if str(c) in picked]
