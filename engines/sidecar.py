"""The JSON sidecar beside every engine, and the check that refuses an engine built elsewhere.

A serialized TensorRT engine only runs on the TensorRT version and the GPU model it was built with.
``<name>.engine.json`` records what was built from what (model, precision, optimization profile, ONNX
sha256, data config) and where (TensorRT version, GPU name and compute capability), so loading can
fail with a clear message instead of a deserialization error, and evaluators read preprocessing from
the sidecar instead of guessing it.

An engine that needs a GPU generation records it (``requires_compute_capability``, "8.9" for fp8, copied
from the graph's metadata; ``requires_tensorrt``, the oldest TensorRT that builds the graph; both None for
fp32/fp16/int8), and :func:`check_requirements` refuses a GPU below it before anything is deserialized.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from t2t_vit.data import DataConfig
from t2t_vit.errors import T2TError
from t2t_vit.files import atomic_write_json

from .trt_compat import EngineRequirements

__all__ = [
    "SIDECAR_FORMAT",
    "SidecarError",
    "EngineMismatchError",
    "sidecar_path",
    "make_sidecar",
    "write_sidecar",
    "read_sidecar",
    "check_sidecar",
    "check_requirements",
    "data_config_from_sidecar",
]

SIDECAR_FORMAT = 1
_REQUIRED = ("format", "model", "precision", "profile", "onnx_sha256", "engine_sha256", "tensorrt_version",
             "gpu", "data_config")


class SidecarError(T2TError, RuntimeError):
    """The sidecar is missing or unreadable; the message says how to fix it."""


class EngineMismatchError(T2TError, RuntimeError):
    """The engine was built for another TensorRT version or GPU (or the file changed since)."""


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.fp16.engine`` -> ``model.fp16.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def make_sidecar(*, model: str, precision: str, profile: Mapping[str, Mapping[str, list[int]]],
                 onnx_path: str | os.PathLike, onnx_sha256: str, engine_sha256: str, tensorrt_version: str,
                 gpu: Mapping[str, str], build_time_s: float, built_at: str,
                 onnx_metadata: Mapping[str, str], data_config: Mapping[str, str],
                 builder: Mapping[str, Any], requirements: EngineRequirements | None = None) -> dict[str, Any]:
    """The sidecar as plain data (every value JSON-serializable); ``requirements``: what the graph needs of the
    GPU and TensorRT (:meth:`EngineRequirements.from_metadata`), recorded as ``requires_*`` (None: nothing)."""
    return {
        "format": SIDECAR_FORMAT,
        "model": model,
        "precision": precision,
        "profile": {name: {k: [int(d) for d in v] for k, v in shapes.items()} for name, shapes in profile.items()},
        "onnx": Path(onnx_path).name,
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "tensorrt_version": str(tensorrt_version),
        "gpu": {"name": str(gpu["name"]), "compute_capability": str(gpu["compute_capability"])},
        **(requirements or EngineRequirements()).to_sidecar(),
        "build_time_s": round(float(build_time_s), 3),
        "built_at": built_at,
        "builder": dict(builder),
        "data_config": dict(data_config),
        "onnx_metadata": dict(onnx_metadata),
    }


def write_sidecar(engine_path: str | os.PathLike, sidecar: Mapping[str, Any]) -> Path:
    return atomic_write_json(sidecar_path(engine_path), dict(sidecar))


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``engine_path``.

    Raises:
        SidecarError: missing, not JSON, or lacking a required key.
    """
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise SidecarError(
            f"{path} not found: every engine needs the sidecar `make engine` writes beside it (it records the "
            f"TensorRT version, GPU and preprocessing); rebuild the engine with `make engine`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SidecarError(f"{path} is not valid JSON ({e}); rebuild the engine with `make engine`") from e
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise SidecarError(f"{path} lacks {missing}; it was not written by this version of `make engine`: rebuild")
    if data["format"] != SIDECAR_FORMAT:
        raise SidecarError(f"{path} has sidecar format {data['format']}, expected {SIDECAR_FORMAT}; rebuild the engine")
    return data


def _rebuild_hint(sidecar: Mapping[str, Any]) -> str:
    return (f"engines are not portable across TensorRT versions or GPU models: rebuild it here with "
            f"`make engine MODEL={sidecar.get('model')} PRECISION={sidecar.get('precision')}`")


def check_sidecar(sidecar: Mapping[str, Any], *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  engine_sha256: str | None = None, engine_path: str | os.PathLike | None = None) -> None:
    """Refuse an engine whose sidecar disagrees with the running TensorRT and GPU.

    Args:
        sidecar: from :func:`read_sidecar`.
        tensorrt_version: the running ``tensorrt.__version__``.
        gpu_name: the running device's name (``torch.cuda.get_device_name``).
        compute_capability: ``"major.minor"`` of the running device.
        engine_sha256: when given, must equal the sidecar's (the engine file was not swapped).
        engine_path: only for the error message.

    Raises:
        EngineMismatchError: listing every mismatch and how to fix it.
    """
    problems = []
    if str(sidecar["tensorrt_version"]) != str(tensorrt_version):
        problems.append(f"built with TensorRT {sidecar['tensorrt_version']}, running TensorRT {tensorrt_version}")
    built_gpu = sidecar["gpu"]
    if str(built_gpu["compute_capability"]) != str(compute_capability):
        problems.append(f"built for compute capability {built_gpu['compute_capability']}, "
                        f"this GPU has {compute_capability}")
    if str(built_gpu["name"]) != str(gpu_name):
        problems.append(f"built on a {built_gpu['name']}, running on a {gpu_name}")
    if problems:
        where = f"{engine_path}: " if engine_path else ""
        raise EngineMismatchError(f"{where}{'; '.join(problems)}. {_rebuild_hint(sidecar)}")
    if engine_sha256 is not None and engine_sha256 != sidecar["engine_sha256"]:
        where = f"{engine_path} " if engine_path else "the engine "
        raise EngineMismatchError(
            f"{where}does not match its sidecar (sha256 {engine_sha256[:12]}... vs {sidecar['engine_sha256'][:12]}...): "
            f"the file was replaced or damaged after the build. {_rebuild_hint(sidecar)}")


def check_requirements(sidecar: Mapping[str, Any], *, gpu: Mapping[str, str],
                       engine_path: str | os.PathLike | None = None) -> None:
    """Refuse a GPU the engine cannot run on at all (an fp8 engine below its ``requires_compute_capability``),
    whatever else matches: checked before :func:`check_sidecar`, and also where that check is turned off.

    Raises:
        UnsupportedPlatform: one line with what the engine needs, what this GPU has, and what to build instead.
    """
    subject = f"{engine_path or 'the engine'} ({sidecar.get('precision')} engine)"
    EngineRequirements.from_sidecar(sidecar).check(gpu=gpu, subject=subject)


def data_config_from_sidecar(sidecar: Mapping[str, Any]):
    """The :class:`t2t_vit.data.DataConfig` recorded at build time."""
    return DataConfig.from_metadata(sidecar["data_config"])
