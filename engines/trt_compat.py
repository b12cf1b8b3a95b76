"""The one place that imports TensorRT, tells 10.x from 11.x, and lists every TensorRT name we use.

TensorRT cannot be installed on the development and CI machines, so the TensorRT code is kept thin
and its names are checked statically instead: ``tests/test_engines_trt_names.py`` reads the compiled
bindings of TensorRT 10.13 and 11.4 (downloaded by ``make install``, never installed) and checks that
every name in :data:`TRT_NAMES_USED` exists in both, and that the source uses no TensorRT name outside
that list. Names that exist in one major version only are used behind a version check and listed in
:data:`TRT_NAMES_VERSION_GATED`. Engines are built with Polygraphy's TensorRT loaders; the names they read
on our behalf are :data:`TRT_NAMES_VIA_POLYGRAPHY`, recorded by tests/test_build.py and checked the same way.

How the variants differ (NVIDIA TensorRT developer guide, "Strongly Typed Networks"; TensorRT 10.x release
notes on the deprecated precision flags and calibrators; TensorRT 11 migration notes):

* 10.x: a strongly typed network needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` at creation.
  The enum's integer value differs between releases, so the bit is always computed from the enum.
* 11.x: strongly typed is the only mode; the flag is deprecated and ignored, so no flag is passed.
* Both: no precision builder flags (``BuilderFlag.FP16``/``INT8``) and no calibrators; precision is
  what the ONNX graph's tensor types and Q/DQ nodes say.

Some graphs need more than a strongly typed build (:class:`EngineRequirements`): the fp8 graph of
``make calib PRECISION=fp8`` records ``requires_compute_capability`` (SM 8.9, Ada, and later: FP8 tensor
cores) in its metadata, and needs TensorRT >= 10.6 (:data:`FP8_MIN_VERSION`; TensorRT 10.6.0 release notes:
"Added support for per-channel scaling for FP8 matrix multiplications on Hopper GPUs", which its per-channel
weights need, and FP8 multi-head attention fusion on Ada). TensorRT has no query for the GPU's compute
capability (``platformHasFastFp16``/``Int8`` were deprecated in 10.x and removed in 11, with no FP8
counterpart ever), so it is read through PyTorch (:func:`gpu_info`).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Mapping

from t2t_vit.errors import T2TError

__all__ = [
    "INSTALL_HINT",
    "TensorRTUnavailable",
    "tensorrt_availability",
    "import_tensorrt",
    "parse_version",
    "network_creation_flags",
    "gpu_info",
    "FP8_MIN_VERSION",
    "UnsupportedPlatform",
    "parse_capability",
    "EngineRequirements",
    "TRT_NAMES_USED",
    "TRT_NAMES_VERSION_GATED",
    "TRT_NAMES_VIA_POLYGRAPHY",
    "TRT_NAMES_VIA_POLYGRAPHY_10_ONLY",
    "TRT_NAMES_REMOVED_IN_11",
    "TRT_NAMES_FORBIDDEN",
    "TRT_OBJECT_NAMES",
    "TRT_MODULES",
]

INSTALL_HINT = ("pip install -e '.[tensorrt]' (TensorRT >= 10.1 with its CUDA libraries, on a machine with an "
                "NVIDIA GPU; the trtexec binary ships in NVIDIA's TensorRT tar/deb packages)")
MIN_VERSION = (10, 1)
# The oldest TensorRT that builds the fp8 graph as written: per-channel FP8 GEMM scaling (its weights are
# per output channel) arrived in 10.6 (TensorRT 10.6.0 release notes, "Per-Channel Scaling for FP8 GEMMs",
# stated for Hopper GPUs). docs/tensorrt.md, "FP8 engines", says why this and not 10.1.
FP8_MIN_VERSION = (10, 6)

# Every attribute the engines code reads on the `trt` module or on TensorRT objects. The names test
# collects them from the source by AST (see TRT_OBJECT_NAMES) and requires this list to match exactly.
TRT_NAMES_USED: frozenset[str] = frozenset({
    # module level
    "__version__", "Logger", "WARNING", "Runtime",
    "NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "MemoryPoolType", "WORKSPACE",
    "TensorIOMode", "INPUT",
    "float32", "float16", "bfloat16", "int8", "int32", "int64", "uint8",
    # network (the rest of the build is Polygraphy's: TRT_NAMES_VIA_POLYGRAPHY)
    "num_inputs", "get_input", "name",
    # timing cache: attached with a mismatch check, merged after the build
    "create_timing_cache", "set_timing_cache", "get_timing_cache", "serialize", "combine",
    # runtime, engine, execution context
    "deserialize_cuda_engine", "create_execution_context", "num_io_tensors", "get_tensor_name",
    "get_tensor_mode", "get_tensor_dtype", "get_tensor_profile_shape", "set_input_shape",
    "get_tensor_shape", "set_tensor_address", "execute_async_v3",
})

# Names used only on one side of a version check: name -> the major versions whose code path uses it.
# STRONGLY_TYPED is read only when major == 10 (on 11 it is deprecated and ignored).
TRT_NAMES_VERSION_GATED: dict[str, tuple[int, ...]] = {"STRONGLY_TYPED": (10,)}

# What Polygraphy's loaders read on the module and on TensorRT objects on our behalf, for the options
# engines.build.build_serialized_engine uses (NetworkFromOnnxPath strongly typed, ModifyNetworkOutputs(MARK_ALL),
# CreateConfig with a profile, TF32, workspace and optimization level, EngineBytesFromNetwork), in Polygraphy
# 0.53's source (backend/trt/loader.py, config.py, profile.py, util.py; docs/tensorrt.md says where). The
# recording TensorRT of tests/test_build.py runs the real loaders and requires this list to match what they
# read; the names test checks it against both binding wheels.
TRT_NAMES_VIA_POLYGRAPHY: frozenset[str] = frozenset({
    # module, logger (Polygraphy's own subclasses trt.ILogger and maps the severities), plugins
    "__version__", "Builder", "OnnxParser", "ILogger", "Logger", "INTERNAL_ERROR", "ERROR", "WARNING", "INFO",
    "VERBOSE", "init_libnvinfer_plugins",
    # CreateNetwork (strongly_typed only on 10.x, see network_creation_flags), NetworkFromOnnxPath
    "NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "create_network", "parse_from_file", "num_errors",
    # CreateConfig: profile (Profile.fill_defaults / to_trt), profiling verbosity, workspace, timing cache,
    # optimization level, TF32 (cleared, or set with --tf32), the layer-precision warning
    "create_builder_config", "create_optimization_profile", "num_inputs", "get_input", "name", "is_shape_tensor",
    "shape", "dtype", "set_shape", "add_optimization_profile", "profiling_verbosity", "ProfilingVerbosity",
    "DETAILED", "set_memory_pool_limit", "create_timing_cache", "set_timing_cache", "builder_optimization_level",
    "BuilderFlag", "TF32", "clear_flag", "set_flag", "precision_is_set",
    # EngineBytesFromNetwork: its calibrator hook (a read), its configuration summary, the build
    "int8_calibrator", "DLA_core", "default_device_type", "DeviceType", "DLA", "__members__", "get_flag",
    "engine_capability", "MemoryPoolType", "get_memory_pool_limit", "TacticSource", "get_tactic_sources",
    "num_optimization_profiles", "PreviewFeature", "get_preview_feature", "QuantizationFlag",
    "get_quantization_flag", "build_serialized_network",
    # ModifyNetworkOutputs(MARK_ALL) (make layers): mark_layerwise / mark_outputs
    "LayerType", "TRIP_LIMIT", "ITERATOR", "RECURRENCE", "LOOP_OUTPUT", "SHAPE", "CONSTANT", "type", "num_outputs",
    "get_output", "is_network_output", "unmark_output", "mark_output",
})

# Of those, the names TensorRT 11 removed: Polygraphy reads them only under ``except AttributeError`` or
# ``hasattr`` (its engine summary, its calibrator hook, its layer-precision warning), never to set anything.
TRT_NAMES_VIA_POLYGRAPHY_10_ONLY: frozenset[str] = frozenset({
    "int8_calibrator", "QuantizationFlag", "get_quantization_flag", "precision_is_set",
})

# Removed in TensorRT 11 (precision flags, implicit calibration, implicit batch; deprecated since 10.1-10.12).
TRT_NAMES_REMOVED_IN_11: frozenset[str] = frozenset({
    "FP16", "INT8", "int8_calibrator", "IInt8EntropyCalibrator2", "IInt8Calibrator", "EXPLICIT_BATCH",
    "platform_has_fast_fp16", "platform_has_fast_int8",
})

# Never used anywhere in engines/: the removed names, and setting any builder flag (precision is a property
# of the ONNX graph; the only flag touched is TF32, which is cleared).
TRT_NAMES_FORBIDDEN: frozenset[str] = TRT_NAMES_REMOVED_IN_11 | {"set_flag"}

# Variables (or ``self._<name>`` attributes) that hold TensorRT objects in TRT_MODULES. The names
# test treats attribute access on these, and on the `trt` module, as TensorRT API use; other objects
# in those modules must not use these variable names.
TRT_OBJECT_NAMES: frozenset[str] = frozenset({
    "logger", "builder", "network", "parser", "config", "profile", "tensor", "serialized", "timing_cache",
    "disk_cache", "runtime", "engine", "context", "trt_dtype",
})

# The modules that touch TensorRT (relative to the repository root).
TRT_MODULES: tuple[str, ...] = ("engines/trt_compat.py", "engines/build.py", "engines/trt_runtime.py")


class TensorRTUnavailable(T2TError, RuntimeError):
    """TensorRT (or a GPU for it) is missing or too old; the message says what to install."""


class UnsupportedPlatform(T2TError, RuntimeError):
    """This GPU or TensorRT cannot build or run a graph's engine (an fp8 engine below SM 8.9, or before
    TensorRT 10.6); the message says what the graph needs and what to build instead."""


def tensorrt_availability() -> tuple[bool, str]:
    """``(True, "")`` when the ``tensorrt`` package is importable and PyTorch sees a CUDA GPU."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, f"the TensorRT Python package is not installed: {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT is installed but no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return True, ""


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.13.3.9"`` -> ``(10, 13, 3, 9)``; ignores suffixes such as ``.post1`` or ``rc1``."""
    parts = re.findall(r"\d+", str(version).split("+")[0])
    if not parts:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return tuple(int(p) for p in parts[:4])


def import_tensorrt(need_gpu: bool = True) -> Any:
    """Import the ``tensorrt`` module (lazily: nothing else in the package imports it at module level).

    Raises:
        TensorRTUnavailable: not installed, older than 10.1, or (with ``need_gpu``) no CUDA GPU.
    """
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(f"TensorRT is not installed: {INSTALL_HINT}")
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:  # the bindings load libnvinfer at import
        raise TensorRTUnavailable(f"`import tensorrt` failed ({e}); reinstall it: {INSTALL_HINT}") from e
    if parse_version(trt.__version__)[:2] < MIN_VERSION:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is too old: strongly typed engines need >= "
            f"{'.'.join(map(str, MIN_VERSION))}; {INSTALL_HINT}")
    if need_gpu:
        ok, why = tensorrt_availability()
        if not ok:
            raise TensorRTUnavailable(why)
    return trt


def network_creation_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT.

    10.x: the STRONGLY_TYPED bit, computed from the enum (its value is not stable across releases).
    11.x: 0, strongly typed is the default and only mode.
    """
    major = parse_version(trt.__version__)[0]
    if major >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED; {INSTALL_HINT}")
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def gpu_info(device: int | None = None) -> dict[str, str]:
    """Name and compute capability of the CUDA device TensorRT will build for / run on."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU is visible to PyTorch; TensorRT engines need one")
    idx = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(idx)
    return {"name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


def parse_capability(text: str) -> tuple[int, int]:
    """``"8.9"`` -> ``(8, 9)``, for comparing compute capabilities (``"10.0"`` is above ``"8.9"``).

    Raises:
        ValueError: not ``major.minor``.
    """
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"compute capability {text!r} is not major.minor (such as 8.9)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class EngineRequirements:
    """What an engine needs beyond a strongly typed build: a GPU generation and a TensorRT release (None: any).

    Read from the graph's metadata when building (:meth:`from_metadata`) and recorded in the sidecar, read back
    from it when running (:meth:`from_sidecar`).
    """

    compute_capability: str | None = None
    tensorrt: str | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str = "the graph") -> EngineRequirements:
        """The requirements of a graph: its ``requires_compute_capability``, and for an fp8 graph (metadata
        ``precision`` fp8 or ``qdq_dtype`` float8e4m3fn) TensorRT >= :data:`FP8_MIN_VERSION`.

        Raises:
            ValueError: an fp8 graph without ``requires_compute_capability`` (not written by
                ``make calib PRECISION=fp8``), or a value that is not ``major.minor``.
        """
        fp8 = meta.get("precision") == "fp8" or meta.get("qdq_dtype") == "float8e4m3fn"
        cc = (meta.get("requires_compute_capability") or "").strip() or None
        if fp8 and cc is None:
            raise ValueError(f"{source} is an fp8 graph but its metadata lacks requires_compute_capability: "
                             f"re-create it with `make calib PRECISION=fp8`")
        if cc is not None:
            try:
                parse_capability(cc)
            except ValueError as e:
                raise ValueError(f"{source}: metadata requires_compute_capability: {e}") from e
        return cls(cc, ".".join(map(str, FP8_MIN_VERSION)) if fp8 else None)

    @classmethod
    def from_sidecar(cls, sidecar: Mapping[str, Any]) -> EngineRequirements:
        """The requirements ``make engine`` recorded (sidecars of engines without any have none)."""
        return cls(sidecar.get("requires_compute_capability"), sidecar.get("requires_tensorrt"))

    def problems(self, *, gpu: Mapping[str, str] | None = None, tensorrt_version: str | None = None,
                 subject: str = "this graph") -> list[str]:
        """Why ``gpu`` (``{"name", "compute_capability"}``) or ``tensorrt_version`` cannot build/run it ([] when
        they can, or when not given)."""
        out = []
        if self.tensorrt and tensorrt_version is not None and \
                parse_version(tensorrt_version)[:2] < parse_version(self.tensorrt)[:2]:
            out.append(f"{subject} needs TensorRT >= {self.tensorrt}, this is TensorRT {tensorrt_version} "
                       f"(upgrade: pip install -U 'tensorrt>={self.tensorrt}')")
        if self.compute_capability and gpu is not None and \
                parse_capability(gpu["compute_capability"]) < parse_capability(self.compute_capability):
            out.append(f"{subject} needs a GPU of compute capability {self.compute_capability} or later "
                       f"(FP8 tensor cores: Ada, Hopper and later), this {gpu['name']} has "
                       f"{gpu['compute_capability']}: build the int8 engine instead (`make engine PRECISION=int8`)")
        return out

    def check(self, *, gpu: Mapping[str, str] | None = None, tensorrt_version: str | None = None,
              subject: str = "this graph") -> None:
        """Raises :class:`UnsupportedPlatform` with every problem of :meth:`problems`."""
        problems = self.problems(gpu=gpu, tensorrt_version=tensorrt_version, subject=subject)
        if problems:
            raise UnsupportedPlatform("; ".join(problems))

    def to_sidecar(self) -> dict[str, str | None]:
        return {"requires_compute_capability": self.compute_capability, "requires_tensorrt": self.tensorrt}
