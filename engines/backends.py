"""The one backend factory: a :class:`t2t_vit.backends.BackendSpec` and an artifacts folder -> a runner or
a skip reason; and which backends this machine can run (``python -m engines.backends``).

::

    from engines.backends import Skip, resolve_backend

    runner = resolve_backend("onnxruntime-cpu-int8", "artifacts/t2t_vit_7", "t2t_vit_7", threads=4)
    if isinstance(runner, Skip):
        print(runner.reason)             # e.g. "artifacts/t2t_vit_7/t2t_vit_7.int8.onnx not found (...)"
    else:
        with runner:
            logits = runner.infer(images)

It lives in ``engines`` because it makes TensorRT runners too (``t2t_vit`` may not import this stage);
every tool above it (the engines benchmark, parity, the demo, serving) makes its runners here. Runner
construction is device-free (files and metadata only): the GPU is touched inside ``with`` only, with one
exception: an engine that records a minimum compute capability (an fp8 engine: SM 8.9+,
:func:`required_compute_capability`) is checked against the GPU's (PyTorch's CUDA query) and skipped with one
line naming the requirement on an older GPU (:func:`capability_shortfall`).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from t2t_vit.artifacts import make_hint
from t2t_vit.backends import DEVICES, BackendSpec, parse_backend
from t2t_vit.checkpoint import build_model
from t2t_vit.runners import OnnxRuntimeRunner, Runner, TorchRunner

from .trt_compat import gpu_info
from .trt_runtime import TensorRTRunner

__all__ = ["Skip", "resolve_backend", "artifact_runner", "availability", "required_compute_capability",
           "capability_shortfall", "BackendStatus", "backend_statuses", "get_args_parser", "main"]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Skip:
    """A backend that cannot run here: why (and how to fix it), and the file it would have run."""

    backend: BackendSpec
    reason: str
    artifact: str | None = None


def availability(spec: BackendSpec) -> tuple[bool, str]:
    """Whether the backend's runtime runs on this machine: ``(True, "")`` or ``(False, reason)``."""
    if spec.runtime == "pytorch":
        return TorchRunner.availability(spec.device)
    if spec.runtime == "onnxruntime":
        return OnnxRuntimeRunner.availability(spec.device)
    return TensorRTRunner.availability()


def required_compute_capability(record: Mapping[str, Any]) -> str | None:
    """The minimum compute capability (``"8.9"``) an artifact records, or None when it records none.

    ``record`` is an engine sidecar or an ONNX graph's metadata: the sidecar's own
    ``requires_compute_capability`` when ``make engine`` writes one, else the one in the metadata of the ONNX
    graph it was built from (``onnx_metadata``; ``make calib PRECISION=fp8`` writes it), else the metadata's own.
    """
    for where in (record, record.get("onnx_metadata") or {}):
        value = where.get("requires_compute_capability") if isinstance(where, Mapping) else None
        if value not in (None, ""):
            return str(value)
    return None


def _capability(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).strip().split("."))
    except ValueError:
        raise ValueError(f"compute capability {text!r}: expected 'major.minor', e.g. '8.9'") from None


def capability_shortfall(required: str | None, gpu: Mapping[str, str], what: str = "this engine") -> str:
    """One line when ``gpu`` (``{"name", "compute_capability"}``) is below ``required``, else ''."""
    if not required or _capability(gpu["compute_capability"]) >= _capability(required):
        return ""
    return (f"{what} needs a GPU of compute capability {required} or later; this GPU ({gpu['name']}) has "
            f"{gpu['compute_capability']}")


def _missing_hint(spec: BackendSpec, model: str) -> str:
    if spec.runtime == "tensorrt":
        return f"build it with `make engine PRECISION={spec.precision}`"
    return f"create it with {make_hint(spec.precision, model)} and the same OUT"


def artifact_runner(path: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None,
                    spinning: bool | None = None) -> Runner:
    """The runner of one artifact file, as every tool builds it: an ``.engine`` on TensorRT (its sidecar
    checked when activated), any other file as an ONNX graph on ONNX Runtime's ``provider`` (``threads``
    and ``spinning``: :class:`~t2t_vit.runners.OnnxRuntimeRunner`)."""
    path = Path(path)
    if path.suffix == ".engine":
        return TensorRTRunner(path)
    return OnnxRuntimeRunner(path, provider=provider, threads=threads, spinning=spinning)


def resolve_backend(spec: BackendSpec | str, artifacts: str | os.PathLike, model_name: str, *,
                    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
                    checkpoint: str | os.PathLike | None = None, threads: int | None = None,
                    gpu: Callable[[], Mapping[str, str]] | None = None) -> Runner | Skip:
    """The runner a backend names, built (device-free) from the artifacts folder, or why it cannot run.

    Args:
        spec: a spec, or a backend name (parsed: an unknown or old name raises).
        artifacts: the folder holding ``<model>.<precision>.onnx`` / ``.engine`` (OUT=).
        model_name: the registered model the files were made for.
        model: PyTorch backends: the module (or a function returning it, called only when needed);
            default: :func:`t2t_vit.checkpoint.build_model` of ``model_name`` with ``checkpoint``.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default).
        gpu: the running GPU's ``{"name", "compute_capability"}``, asked only for an engine that records a
            minimum compute capability (default :func:`engines.trt_compat.gpu_info`).

    Returns:
        The runner (activate it with ``with``), or a :class:`Skip` when the runtime is missing here, the
        file is absent (the reason says how to make it) or the engine needs a newer GPU than this one.

    Raises:
        RunnerError: an unknown backend name. Errors reading a present file (GraphError, SidecarError)
            propagate: a damaged file is not a skip.
    """
    spec = parse_backend(spec)
    path = spec.artifact(artifacts, model_name)
    ok, why = availability(spec)
    if not ok:
        return Skip(spec, why, str(path) if path else None)
    if path is not None and not path.is_file():
        return Skip(spec, f"{path} not found ({_missing_hint(spec, model_name)})", str(path))
    if spec.runtime in ("onnxruntime", "tensorrt"):
        runner = artifact_runner(path, provider=spec.device, threads=threads)
        need = required_compute_capability(runner.sidecar) if isinstance(runner, TensorRTRunner) else None
        if need:  # the GPU is asked only for an engine that records a requirement
            short = capability_shortfall(need, (gpu or gpu_info)(), what=f"{path} (an {runner.precision} engine)")
            if short:
                return Skip(spec, short, str(path))
        return runner
    if model is None:
        model = build_model(model_name, checkpoint).eval()
    elif callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    return TorchRunner(model, device=spec.device, autocast_dtype=_AUTOCAST[spec.precision], compile=spec.compile)


# ----------------------------------------------------------------------------------------------------
# The listing
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendStatus:
    """One backend family on this machine: whether it runs, and if not, why."""

    backend: str
    available: bool
    reason: str = ""


def backend_statuses() -> list[BackendStatus]:
    """Every backend family (runtime on a device) this project knows, with the reason when unavailable."""
    families = [("pytorch", d) for d in DEVICES] + [("onnxruntime", d) for d in DEVICES] + [("tensorrt", "cuda")]
    out = []
    for runtime, device in families:
        ok, why = availability(BackendSpec(runtime, device, "fp32"))
        name = runtime if runtime == "tensorrt" else f"{runtime}-{device}"
        out.append(BackendStatus(name, bool(ok), "" if ok else str(why)))
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="List the inference backends available on this machine",
                                     add_help=add_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    statuses = backend_statuses()
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        width = max(len(s.backend) for s in statuses)
        for s in statuses:
            print(f"{s.backend:<{width}}  {'available' if s.available else 'skipped: ' + s.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
