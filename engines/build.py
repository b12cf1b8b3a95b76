"""Build a strongly typed TensorRT engine from a typed ONNX graph (``make engine``).

``<out>/<model>.<precision>.onnx`` (from ``make onnx`` / ``make calib``) -> ``<out>/<model>.<precision>.engine``
plus its sidecar ``<model>.<precision>.engine.json`` (see :mod:`engines.sidecar`).

Every engine of the project is built by :func:`build_serialized_engine`, on Polygraphy's TensorRT loaders
(``NetworkFromOnnxPath`` -> ``CreateConfig`` -> ``EngineBytesFromNetwork``); ``make layers`` builds its
every-tensor-an-output engine through it too. Which TensorRT calls those loaders make for the options used
here, on 10.x and 11.x, is in docs/tensorrt.md.

Precision is a property of the ONNX graph: fp16 by fp16-typed tensors, int8 and fp8 by Q/DQ nodes (int8 or
float8e4m3fn zero points: ``make calib [PRECISION=fp8]``). An fp8 graph needs an SM 8.9+ GPU (its metadata's
``requires_compute_capability``, recorded in the sidecar) and TensorRT >= 10.6; the build refuses anything
less before it builds or writes anything (:func:`check_platform`). The network
is strongly typed (the creation flag on TensorRT 10.x, the only mode on 11.x) and no precision builder
flag or calibrator is ever set, so the engine computes in the types the graph declares on both major
versions. TF32 is the one precision TensorRT enables by itself (``BuilderFlag.TF32`` is on by default in
10.x and 11.x, strongly typed networks included): it rounds the inputs of fp32 MatMul/Conv to a 10-bit
mantissa, in the fp32 engine and in the fp32 Performer island of the fp16/int8 engines. The build clears
it (``CreateConfig(tf32=False)``), so fp32 in the graph means fp32 in the engine; ``--tf32`` allows it
(recorded in the sidecar). What TF32 costs in accuracy is measured by ``make precision``
(reports/precision-tf32-*).

One optimization profile covers the batch axis (min/opt/max, default 1/32/128). The timing cache file is
read before every build and merged into (``ITimingCache.combine``, under Polygraphy's lock on the file)
after it, so builds that share it, one after another or at the same time, keep each other's entries and
later builds on the same GPU and TensorRT version skip most tactic timing. A cache from another TensorRT
or GPU is refused, not merged. Builder optimization level 0 does not use the timing cache (TensorRT: "this
will also not respect a timing cache").

Usage::

    python -m engines.build --model t2t_vit_12 --precision fp16            # needs TensorRT and a GPU
    python -m engines.build --model t2t_vit_12 --precision int8 --dry-run  # the plan, no TensorRT needed
    python -m engines.build --model t2t_vit_12 --precision fp8             # SM 8.9+ GPU, TensorRT >= 10.6
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from t2t_vit.artifacts import ENGINE_PRECISIONS, default_out, engine_path, make_hint, onnx_path
from t2t_vit.cli import add_stage_args, run_command
from t2t_vit.data import DataConfig, DataError
from t2t_vit.errors import T2TError
from t2t_vit.files import OutputLock, atomic_write_bytes, file_sha256
from t2t_vit.graphs import GraphError, expect_graph, graph_inputs, read_metadata

from .sidecar import make_sidecar, sidecar_path, write_sidecar
from .trt_compat import (EngineRequirements, TensorRTUnavailable, gpu_info, import_tensorrt,
                         network_creation_flags)

_logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "BuildError",
    "BuildSettings",
    "OnnxInputs",
    "inspect_onnx",
    "profile_shapes",
    "plan_build",
    "graph_requirements",
    "check_platform",
    "default_timing_cache",
    "BuiltEngine",
    "build_serialized_engine",
    "build_engine",
    "get_args_parser",
    "main",
]

PRECISIONS = ENGINE_PRECISIONS


class BuildError(T2TError, RuntimeError):
    """The engine cannot be built as asked; the message says how to fix it."""


@dataclass(frozen=True)
class BuildSettings:
    """Builder knobs. ``timing_cache=None`` means ``.cache/tensorrt/timing-<trt>-<gpu>.cache``."""

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    workspace_mib: int = 4096
    opt_level: int = 3
    timing_cache: str | None = None
    tf32: bool = False

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BuildError(f"optimization profile needs 1 <= min <= opt <= max batch, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib <= 0:
            raise BuildError(f"--workspace-mib must be positive, got {self.workspace_mib}")
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be 0..5 (TensorRT's builder optimization level), got {self.opt_level}")


@dataclass(frozen=True)
class OnnxInputs:
    """Graph inputs (name -> dims, an int or the symbolic name of a dynamic axis) and metadata_props."""

    inputs: dict[str, list[int | str]]
    metadata: dict[str, str]


def inspect_onnx(path: str | os.PathLike) -> OnnxInputs:
    """Input names/dims and metadata of an ONNX file, without loading external weights."""
    return OnnxInputs(inputs=graph_inputs(path), metadata=read_metadata(path))


def profile_shapes(inputs: dict[str, list[int | str]], settings: BuildSettings,
                   img_size: int | None = None) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of every input: the batch axis from ``settings``, the rest from the graph.

    Raises:
        BuildError: a non-batch axis is dynamic, or the batch axis is static but the profile asks
            for other batch sizes.
    """
    settings.validate()
    out = {}
    for name, dims in inputs.items():
        if not dims:
            raise BuildError(f"input {name!r} has no shape in the ONNX graph; re-export it with `make onnx`")
        rest = []
        for axis, d in enumerate(dims[1:], start=1):
            if isinstance(d, str):
                raise BuildError(f"input {name!r} axis {axis} is dynamic ({d!r}); only the batch axis may be: "
                                 f"re-export with a fixed image size (`make onnx IMG_SIZE=...`)")
            rest.append(int(d))
        if img_size is not None and len(rest) == 3 and rest[1:] != [img_size, img_size]:
            raise BuildError(f"input {name!r} is {rest[1]}x{rest[2]} in the ONNX graph but --img-size is {img_size}; "
                             f"re-export at {img_size} or drop --img-size")
        batch = dims[0]
        if isinstance(batch, int) and not (settings.min_batch == settings.opt_batch == settings.max_batch == batch):
            raise BuildError(f"input {name!r} has a static batch of {batch} but the profile asks for "
                             f"{settings.min_batch}/{settings.opt_batch}/{settings.max_batch}; export with a dynamic "
                             f"batch axis or pass --min-batch/--opt-batch/--max-batch {batch}")
        out[name] = {k: [b, *rest] for k, b in
                     (("min", settings.min_batch), ("opt", settings.opt_batch), ("max", settings.max_batch))}
    if not out:
        raise BuildError("the ONNX graph has no inputs")
    return out


def plan_build(model: str, precision: str, out: str | os.PathLike, settings: BuildSettings,
               onnx_file: str | os.PathLike | None = None, engine_file: str | os.PathLike | None = None,
               img_size: int | None = None, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything about a build that can be known without TensorRT: paths, shapes, data config.

    With ``checkpoint``, its sha256 must equal the ONNX metadata's ``checkpoint_sha256`` (when recorded).

    Raises:
        BuildError: missing ONNX, precision or data config disagreeing with the graph, bad profile.
    """
    if precision not in PRECISIONS:
        raise BuildError(f"precision {precision!r}: use one of {PRECISIONS}")
    onnx_file = Path(onnx_file) if onnx_file else onnx_path(out, model, precision)
    engine_file = Path(engine_file) if engine_file else engine_path(out, model, precision)
    if not onnx_file.is_file():
        raise BuildError(f"{onnx_file} not found: create it with {make_hint(precision, model)} "
                         f"(or pass --onnx PATH)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise BuildError(f"checkpoint {checkpoint} not found")
    try:  # the shared check of every stage that takes a graph: model, precision, checkpoint
        expect_graph(onnx_file, model=model, precision=precision, checkpoint=checkpoint, out=out,
                     checkpoint_sha=file_sha256(checkpoint) if checkpoint is not None else None)
    except GraphError as e:
        raise BuildError(str(e)) from e
    info = inspect_onnx(onnx_file)
    meta = info.metadata
    try:
        data_config = DataConfig.from_metadata(meta).to_metadata()
    except DataError as e:
        raise BuildError(f"{onnx_file}: {e}") from e
    shapes = profile_shapes(info.inputs, settings, img_size=img_size)
    requirements = graph_requirements(onnx_file, meta)
    return {"model": model, "precision": precision, "onnx": str(onnx_file), "engine": str(engine_file),
            "sidecar": str(sidecar_path(engine_file)), "profile": shapes, "data_config": data_config,
            **requirements.to_sidecar(), "onnx_metadata": meta, "settings": asdict(settings)}


def graph_requirements(onnx_file: str | os.PathLike, meta: dict[str, str] | None = None) -> EngineRequirements:
    """What the graph's engine needs of the GPU and TensorRT, from its metadata (fp8: SM 8.9+, TensorRT >= 10.6).

    Raises:
        BuildError: an fp8 graph that does not record its compute capability (not made by ``make calib``).
    """
    try:
        return EngineRequirements.from_metadata(read_metadata(onnx_file) if meta is None else meta, str(onnx_file))
    except ValueError as e:
        raise BuildError(str(e)) from e


def check_platform(requirements: EngineRequirements, onnx_file: str | os.PathLike, tensorrt_version: str,
                   gpu: dict[str, str]) -> None:
    """Refuse to build a graph this TensorRT or GPU cannot run (an fp8 graph below SM 8.9 or TensorRT 10.6)
    before anything is read or written; :class:`~engines.trt_compat.UnsupportedPlatform` says what it needs."""
    requirements.check(gpu=gpu, tensorrt_version=tensorrt_version, subject=f"{onnx_file}")


def default_timing_cache(tensorrt_version: str, gpu_name: str) -> Path:
    """One timing cache per TensorRT version and GPU model, shared by every model's builds."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return Path(".cache") / "tensorrt" / f"timing-trt{tensorrt_version}-{slug}.cache"


@dataclass(frozen=True)
class BuiltEngine:
    """A serialized engine and the facts about its build that a sidecar records."""

    serialized: Any  # trt.IHostMemory (bytes-like)
    tensorrt_version: str
    gpu: dict[str, str]
    timing_cache: Path
    build_time_s: float
    network_creation_flags: int
    polygraphy_version: str


def _check_network_inputs(network: Any, shapes: dict[str, dict[str, list[int]]]) -> None:
    """TensorRT's view of the inputs must be the graph's: a profile name Polygraphy cannot match is fatal, but an
    input the profile misses would silently get Polygraphy's default static shape (1 for a dynamic axis)."""
    seen = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        seen.append(tensor.name)
    if sorted(seen) != sorted(shapes):
        raise BuildError(f"TensorRT sees inputs {sorted(seen)}, the ONNX graph lists {sorted(shapes)}")


def _use_timing_cache(config: Any, cache_bytes: bytes) -> None:
    """Attach the saved timing cache, refusing one from another TensorRT/GPU (``ignore_mismatch=False``).

    Polygraphy's ``CreateConfig(load_timing_cache=...)`` does not check ``set_timing_cache``'s result, so a
    mismatched cache would pass silently: the check is ours. ``CreateConfig`` has already attached an empty
    cache, which stays when there is nothing saved or the saved one does not match."""
    if not cache_bytes:
        return
    timing_cache = config.create_timing_cache(cache_bytes)
    if timing_cache is None or not config.set_timing_cache(timing_cache, False):
        _logger.warning("the timing cache does not match this TensorRT/GPU; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _merge_timing_cache(config: Any, cache_file: Path, timing_cache: Any) -> None:
    """Merge this build's timing cache into the file: re-read it under the lock (another build may have written
    it meanwhile), combine, write atomically. A file from another TensorRT version or GPU is replaced.

    The lock is Polygraphy's ``util.LockFile`` (``fcntl.lockf`` on ``<cache>.lock``), the one its own timing
    cache readers and writers take. Polygraphy's ``save_timing_cache`` is not used: it combines with
    ``ignore_mismatch=True`` (keeping another GPU's timings) and writes the file in place, not atomically."""
    from polygraphy import util as pg_util

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with pg_util.LockFile(str(cache_file)):
        on_disk = cache_file.read_bytes() if cache_file.is_file() else b""
        disk_cache = config.create_timing_cache(on_disk)
        if on_disk and disk_cache is not None and disk_cache.combine(timing_cache, False):
            merged = disk_cache.serialize()
        else:
            merged = timing_cache.serialize()
        atomic_write_bytes(cache_file, merged)


def build_serialized_engine(onnx_file: str | os.PathLike, shapes: dict[str, dict[str, list[int]]],
                            settings: BuildSettings = BuildSettings(), *,
                            mark_all_outputs: bool = False) -> BuiltEngine:
    """The one engine build of the project, on Polygraphy's TensorRT loaders (``make engine`` and ``make layers``).

    ``NetworkFromOnnxPath`` parses the file (``parse_from_file``, so external weights next to it are found) into
    a strongly typed network (the creation flag on 10.x, none on 11.x: :func:`network_creation_flags`);
    ``mark_all_outputs`` marks every tensor an output (``ModifyNetworkOutputs(MARK_ALL)``, for layer-wise
    comparison). ``CreateConfig`` adds one profile (``shapes``: input -> min/opt/max), the workspace limit, the
    optimization level and clears TF32 unless ``settings.tf32``; no precision flag or calibrator is set.
    ``EngineBytesFromNetwork`` builds and serializes. The timing cache (``settings.timing_cache`` or
    :func:`default_timing_cache`) is read before and merged into after the build. Nothing else is written.

    Raises:
        TensorRTUnavailable: TensorRT or a GPU is missing.
        UnsupportedPlatform: the graph needs a newer GPU or TensorRT (fp8: SM 8.9+, TensorRT >= 10.6).
        BuildError: TensorRT rejected the graph or the build failed (its errors are logged above).
    """
    trt = import_tensorrt()
    import polygraphy
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, ModifyNetworkOutputs,
                                        NetworkFromOnnxPath, Profile)
    from polygraphy.constants import MARK_ALL
    from polygraphy.exception import PolygraphyException

    settings.validate()
    gpu = gpu_info()
    check_platform(graph_requirements(onnx_file), onnx_file, trt.__version__, gpu)
    cache_file = Path(settings.timing_cache) if settings.timing_cache else default_timing_cache(trt.__version__, gpu["name"])
    cache_in = cache_file.read_bytes() if cache_file.is_file() else b""
    if settings.opt_level == 0:
        _logger.warning("--opt-level 0 does not use the timing cache (TensorRT picks the first tactic that runs)")
    flags = network_creation_flags(trt)
    load_network = NetworkFromOnnxPath(str(onnx_file), strongly_typed=bool(flags))
    if mark_all_outputs:
        load_network = ModifyNetworkOutputs(load_network, outputs=MARK_ALL)
    batch_profile = Profile()
    for name, s in shapes.items():
        batch_profile.add(name, s["min"], s["opt"], s["max"])
    make_config = CreateConfig(tf32=settings.tf32, profiles=[batch_profile],
                               memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(settings.workspace_mib) << 20},
                               builder_optimization_level=int(settings.opt_level))
    try:
        builder, network, parser = load_network()
    except PolygraphyException as e:
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_file} ({e}); its errors are above") from e
    _check_network_inputs(network, shapes)
    try:
        config = make_config(builder, network)
    except PolygraphyException as e:
        raise BuildError(f"cannot configure the TensorRT build of {onnx_file}: {e}") from e
    _use_timing_cache(config, cache_in)
    t0 = time.perf_counter()
    try:
        serialized = EngineBytesFromNetwork((builder, network, parser), config=config)()
    except PolygraphyException as e:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_file}; the builder's errors are above "
                         f"(try a larger --workspace-mib, or check the graph with `polygraphy inspect model`)") from e
    build_time = time.perf_counter() - t0
    _merge_timing_cache(config, cache_file, config.get_timing_cache())
    return BuiltEngine(serialized=serialized, tensorrt_version=trt.__version__, gpu=gpu, timing_cache=cache_file,
                       build_time_s=build_time, network_creation_flags=flags,
                       polygraphy_version=polygraphy.__version__)


def build_engine(model: str, precision: str, out: str | os.PathLike, settings: BuildSettings = BuildSettings(),
                 onnx_file: str | os.PathLike | None = None, engine_file: str | os.PathLike | None = None,
                 img_size: int | None = None, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build ``<out>/<model>.<precision>.engine`` (:func:`build_serialized_engine`) and its sidecar; returns the
    sidecar.

    TensorRT is imported first, so without it nothing is read or written.

    Raises:
        TensorRTUnavailable: TensorRT or a GPU is missing.
        UnsupportedPlatform: the graph needs a newer GPU or TensorRT (fp8); nothing is written.
        BuildError: bad input, or the build failed.
    """
    trt = import_tensorrt()
    plan = plan_build(model, precision, out, settings, onnx_file, engine_file, img_size, checkpoint)
    onnx_file, engine_file = Path(plan["onnx"]), Path(plan["engine"])
    requirements = EngineRequirements(plan["requires_compute_capability"], plan["requires_tensorrt"])
    check_platform(requirements, onnx_file, trt.__version__, gpu_info())  # before the lock creates anything
    with OutputLock(engine_file.parent):  # a second build into the same folder is refused, not interleaved
        built = build_serialized_engine(onnx_file, plan["profile"], settings)
        serialized = built.serialized
        atomic_write_bytes(engine_file, serialized)
        sidecar = make_sidecar(
            model=model, precision=precision, profile=plan["profile"], onnx_path=onnx_file,
            onnx_sha256=file_sha256(onnx_file), engine_sha256=hashlib.sha256(memoryview(serialized)).hexdigest(),
            tensorrt_version=built.tensorrt_version, gpu=built.gpu, build_time_s=built.build_time_s,
            built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            onnx_metadata=plan["onnx_metadata"], data_config=plan["data_config"],
            builder={**asdict(settings), "timing_cache": str(built.timing_cache), "strongly_typed": True,
                     "tf32": "allowed (--tf32)" if settings.tf32 else "cleared: fp32 tensors compute in fp32",
                     "network_creation_flags": built.network_creation_flags,
                     "polygraphy": built.polygraphy_version},
            requirements=requirements,
        )
        # The sidecar goes last: an engine without one (or with a stale one, by engine_sha256) is refused.
        write_sidecar(engine_file, sidecar)
    return sidecar


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build a strongly typed TensorRT engine from a typed ONNX graph",
                                add_help=add_help)
    add_stage_args(p, weights=False,
                   checkpoint_help="the weights come from the ONNX file; if given, it must be the checkpoint the "
                                   "ONNX metadata records",
                   img_size_help="check the ONNX input is this size (default: as exported)")
    g = p.add_argument_group("engine")
    g.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="which typed ONNX to build: <out>/<model>.<precision>.onnx (default: fp16; fp8 needs a "
                        "GPU of compute capability 8.9+ and TensorRT >= 10.6)")
    g.add_argument("--onnx", default=None, help="ONNX file to build instead of <out>/<model>.<precision>.onnx")
    g.add_argument("--engine", default=None, help="engine path (default: <out>/<model>.<precision>.engine)")
    d = BuildSettings()
    g.add_argument("--min-batch", type=int, default=d.min_batch, help=f"profile minimum batch (default {d.min_batch})")
    g.add_argument("--opt-batch", type=int, default=d.opt_batch, help=f"profile optimum batch (default {d.opt_batch})")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help=f"profile maximum batch (default {d.max_batch})")
    g.add_argument("--workspace-mib", type=int, default=d.workspace_mib,
                   help=f"builder workspace limit in MiB (default {d.workspace_mib})")
    g.add_argument("--opt-level", type=int, default=d.opt_level,
                   help=f"builder optimization level 0-5 (default {d.opt_level}, TensorRT's default)")
    g.add_argument("--timing-cache", default=None,
                   help="timing cache file, read and updated (default .cache/tensorrt/timing-<trt>-<gpu>.cache)")
    g.add_argument("--tf32", action="store_true",
                   help="let TensorRT round fp32 MatMul/Conv inputs to TF32 (its own default; off here so fp32 means "
                        "fp32: see docs/tensorrt.md and reports/precision-tf32-*)")
    g.add_argument("--dry-run", action="store_true", help="print the build plan as JSON; needs no TensorRT")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else default_out(args.model)
    settings = BuildSettings(args.min_batch, args.opt_batch, args.max_batch, args.workspace_mib, args.opt_level,
                             args.timing_cache, args.tf32)

    def body() -> int:
        if args.dry_run:
            plan = plan_build(args.model, args.precision, out, settings, args.onnx, args.engine, args.img_size,
                              args.checkpoint)
            print(json.dumps(plan, indent=2))
            return 0
        try:
            sidecar = build_engine(args.model, args.precision, out, settings, args.onnx, args.engine, args.img_size,
                                   args.checkpoint)
        except TensorRTUnavailable as e:  # raised before anything is read or written
            raise TensorRTUnavailable(f"cannot build a TensorRT engine: {e}\n(nothing was written)") from e
        engine = args.engine or engine_path(out, args.model, args.precision)
        needs = (f"; runs on compute capability {sidecar['requires_compute_capability']}+ only"
                 if sidecar.get("requires_compute_capability") else "")
        print(f"wrote {engine} (TensorRT {sidecar['tensorrt_version']}, {sidecar['gpu']['name']}, "
              f"{sidecar['build_time_s']:.1f} s{needs}) and {sidecar_path(engine)}")
        return 0

    return run_command(body, "engines.build")


if __name__ == "__main__":
    raise SystemExit(main())
