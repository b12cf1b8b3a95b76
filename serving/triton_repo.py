"""A Triton Inference Server model repository from a model's artifacts (``make triton``).

::

    python -m serving.triton_repo --model t2t_vit_7 [--out artifacts/t2t_vit_7] [--max-batch-size 32]
    make triton MODEL=t2t_vit_7                 # -> artifacts/t2t_vit_7/triton/

For every artifact present in ``--out``:

* ``<model>.<fp32|fp16|int8|int8-cpu|fp8>.onnx`` -> ``<model>-onnx-<precision>/`` with ``platform:
  "onnxruntime_onnx"``; input/output names, types and dims read from the graph, ``max_batch_size`` from
  ``--max-batch-size`` (the graphs have a dynamic batch dimension). The fp8 graph's float8e4m3fn Q/DQ
  (opset 19) need the server's ONNX Runtime to have float8 QuantizeLinear/DequantizeLinear kernels; it runs
  there as the project's ``onnxruntime-cpu-fp8`` does: an emulation, not FP8 arithmetic.
* ``<model>.<precision>.engine`` -> ``<model>-trt-<precision>/`` with ``platform: "tensorrt_plan"``,
  ``max_batch_size`` and dims from the optimization profile in the engine's sidecar, types from the ONNX
  graph it was built from, and ``built_for.json`` beside it: the TensorRT version and GPU the engine was
  built for (it loads on no other), and the minimum compute capability it records, when it records one
  (an fp8 engine: 8.9).
* ``<model>-preprocess/``: a Python-backend model (:mod:`serving.triton_python.preprocess`) taking
  encoded image bytes (``TYPE_STRING``) and applying the artifact's eval transform (its data config is a
  config parameter), and ``<model>-classify/``: an ensemble chaining it to the classifier (the engine
  where one exists, else the fp32 graph; ``--classifier``), so a client sends JPEG bytes and gets logits,
  or top-k labels through Triton's classification extension (``labels.txt`` beside each classifier).

Every classifier gets ``dynamic_batching`` (preferred sizes: the powers of two up to the maximum, and the
profile's optimum for an engine), an ``instance_group`` (CPU for ONNX Runtime, GPU for TensorRT) and a
``model_warmup`` at batch 1 and the maximum. Configs are built as ``tritonclient``'s ModelConfig protobuf
and written in its text format. The folder is written whole or not at all (built beside, then renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engines.backends import required_compute_capability
from engines.sidecar import read_sidecar
from t2t_vit.artifacts import ENGINE_PRECISIONS, GRAPH_PRECISIONS, default_out, engine_path, onnx_path
from t2t_vit.cli import parse_and_run
from t2t_vit.data import DataConfig
from t2t_vit.errors import T2TError
from t2t_vit.files import file_sha256
from t2t_vit.graphs import read_metadata
from t2t_vit.labels import metadata_class_names

__all__ = ["TritonRepoError", "TensorSpec", "ModelSpec", "onnx_model_spec", "engine_model_spec",
           "classifier_config", "preprocess_config", "ensemble_config", "plan_repository", "write_repository",
           "get_args_parser", "main"]

TOOL = "serving.triton_repo"
PREPROCESS_SOURCE = Path(__file__).with_name("triton_python") / "preprocess.py"
IMAGE_INPUT = "IMAGE"
# ONNX TensorProto element types -> Triton data types (the ones an exported classifier can have).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL"}
TRITON_TO_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_FP64": "float64"}


class TritonRepoError(T2TError, ValueError):
    """Artifacts that cannot make a repository; the message says how to fix it."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch dimension


@dataclass
class ModelSpec:
    """One classifier model of the repository, derived from its artifact."""

    name: str
    platform: str  # onnxruntime_onnx | tensorrt_plan
    precision: str
    artifact: Path
    filename: str  # model.onnx | model.plan
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    preferred: list[int]
    kind: str  # KIND_CPU | KIND_GPU
    data_config: DataConfig
    class_names: list[str] | None
    extra_files: dict[str, Any] = field(default_factory=dict)  # name -> JSON written beside config.pbtxt


def _preferred(max_batch: int, also: Sequence[int] = ()) -> list[int]:
    sizes = {b for b in (2 ** i for i in range(1, 12)) if b <= max_batch} | {b for b in also if 1 < b <= max_batch}
    return sorted(sizes) or [max_batch]


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs, batch dimension dropped (it must be dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or dims[0] != -1:
            raise TritonRepoError(f"{path}: {vi.name} has no dynamic batch dimension (shape {dims}); re-export "
                                  f"with `make onnx` (its graphs have a dynamic batch)")
        if t.elem_type not in _ONNX_TO_TRITON:
            raise TritonRepoError(f"{path}: {vi.name} has ONNX element type {t.elem_type}, which Triton lacks")
        return TensorSpec(vi.name, _ONNX_TO_TRITON[t.elem_type], tuple(dims[1:]))

    return ([spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output])


def onnx_model_spec(path: Path, model: str, precision: str, max_batch_size: int) -> ModelSpec:
    meta = read_metadata(path)
    inputs, outputs = _onnx_io(path)
    return ModelSpec(f"{model}-onnx-{precision}", "onnxruntime_onnx", precision, path, "model.onnx", inputs,
                     outputs, max_batch_size, _preferred(max_batch_size), "KIND_CPU", DataConfig.from_metadata(meta),
                     metadata_class_names(meta))


def engine_model_spec(path: Path, model: str, out: Path) -> ModelSpec:
    """The engine's IO from its sidecar's profile; types (and the output) from the ONNX graph it was built from."""
    side = read_sidecar(path)
    (in_name, shapes), = side["profile"].items()
    graph = out / str(side.get("onnx") or onnx_path(out, model, side["precision"]).name)
    if not graph.is_file():
        raise TritonRepoError(f"{path} was built from {graph.name}, which is not in {out}: the engine's output "
                              f"names and types are read from it; keep the ONNX graph beside the engine")
    if file_sha256(graph) != side["onnx_sha256"]:
        raise TritonRepoError(f"{graph} changed since {path.name} was built (sha256 differs from the sidecar's); "
                              f"rebuild the engine with `make engine MODEL={model} PRECISION={side['precision']}`")
    inputs, outputs = _onnx_io(graph)
    if [i.name for i in inputs] != [in_name]:
        raise TritonRepoError(f"{path}: the sidecar's profile is for {in_name!r}, the graph's inputs are "
                              f"{[i.name for i in inputs]}; rebuild the engine")
    inputs = [TensorSpec(in_name, inputs[0].data_type, tuple(int(d) for d in shapes["max"][1:]))]
    max_batch = int(shapes["max"][0])
    need = required_compute_capability(side)
    built_for = {"tensorrt_version": side["tensorrt_version"], "gpu": side["gpu"],
                 "engine_sha256": side["engine_sha256"], "built_at": side.get("built_at"),
                 "profile": side["profile"],
                 "note": "a TensorRT engine loads only on this TensorRT version and GPU model; rebuild it with "
                         f"`make engine MODEL={model} PRECISION={side['precision']}` on the serving machine"
                         + (f" (a GPU of compute capability {need} or later)" if need else "")}
    if need:
        built_for["requires_compute_capability"] = need
    meta = dict(side.get("onnx_metadata") or {})
    return ModelSpec(f"{model}-trt-{side['precision']}", "tensorrt_plan", str(side["precision"]), path, "model.plan",
                     inputs, outputs, max_batch, _preferred(max_batch, [int(shapes["opt"][0])]), "KIND_GPU",
                     DataConfig.from_metadata(side["data_config"]), metadata_class_names(meta),
                     {"built_for.json": built_for})


# ----------------------------------------------------------------------------------------------------
# Configs (tritonclient's ModelConfig protobuf)
# ----------------------------------------------------------------------------------------------------
def _pb():
    from tritonclient.grpc import model_config_pb2  # the optional serving dependency (pip install -e '.[serve]')

    return model_config_pb2


def _io(msg: Any, spec: TensorSpec, pb: Any) -> None:
    msg.name, msg.data_type = spec.name, pb.DataType.Value(spec.data_type)
    msg.dims.extend(spec.dims)


def classifier_config(spec: ModelSpec, instances: int = 1, queue_delay_us: int = 2000) -> Any:
    pb = _pb()
    cfg = pb.ModelConfig(name=spec.name, platform=spec.platform, max_batch_size=spec.max_batch_size,
                         default_model_filename=spec.filename)
    for t in spec.inputs:
        _io(cfg.input.add(), t, pb)
    for t in spec.outputs:
        out = cfg.output.add()
        _io(out, t, pb)
        out.label_filename = "labels.txt"  # Triton's classification extension: top-k labels on request
    cfg.dynamic_batching.preferred_batch_size.extend(spec.preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(spec.kind))
    for batch in sorted({1, spec.max_batch_size}):
        w = cfg.model_warmup.add(name=f"random_batch_{batch}", batch_size=batch)
        for t in spec.inputs:
            w.inputs[t.name].data_type = pb.DataType.Value(t.data_type)
            w.inputs[t.name].dims.extend(t.dims)
            w.inputs[t.name].random_data = True
    return cfg


def preprocess_config(name: str, classifier: ModelSpec, instances: int = 1) -> Any:
    pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=classifier.max_batch_size)
    _io(cfg.input.add(), TensorSpec(IMAGE_INPUT, "TYPE_STRING", (1,)), pb)
    _io(cfg.output.add(), TensorSpec(classifier.inputs[0].name, classifier.inputs[0].data_type,
                                     classifier.inputs[0].dims), pb)
    cfg.dynamic_batching.SetInParent()
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    cfg.parameters["data_config"].string_value = json.dumps(classifier.data_config.as_dict())
    cfg.parameters["output_dtype"].string_value = TRITON_TO_NUMPY[classifier.inputs[0].data_type]
    return cfg


def ensemble_config(name: str, preprocess: str, classifier: ModelSpec) -> Any:
    pb = _pb()
    out = classifier.outputs[0]
    cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=classifier.max_batch_size)
    _io(cfg.input.add(), TensorSpec(IMAGE_INPUT, "TYPE_STRING", (1,)), pb)
    _io(cfg.output.add(), out, pb)
    cfg.output[0].label_filename = "labels.txt"
    pre = cfg.ensemble_scheduling.step.add(model_name=preprocess, model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[classifier.inputs[0].name] = "preprocessed"
    step = cfg.ensemble_scheduling.step.add(model_name=classifier.name, model_version=-1)
    step.input_map[classifier.inputs[0].name] = "preprocessed"
    step.output_map[out.name] = out.name
    return cfg


def _labels(spec: ModelSpec) -> str:
    """One line per class index: the recorded class name, else the index."""
    n = spec.outputs[0].dims[-1] if spec.outputs and spec.outputs[0].dims else 0
    names = spec.class_names or []
    return "".join(f"{names[i] if i < len(names) else i}\n" for i in range(n))


# ----------------------------------------------------------------------------------------------------
# Plan -> write
# ----------------------------------------------------------------------------------------------------
@dataclass
class RepoPlan:
    model: str
    out: Path
    classifiers: list[ModelSpec]
    ensemble_target: ModelSpec

    @property
    def preprocess_name(self) -> str:
        return f"{self.model}-preprocess"

    @property
    def ensemble_name(self) -> str:
        return f"{self.model}-classify"


def plan_repository(model: str, out: Path, max_batch_size: int = 32, classifier: str | None = None) -> RepoPlan:
    """Every classifier the artifacts in ``out`` make, and the one the ensemble uses.

    Raises:
        TritonRepoError: no artifact of ``model`` in ``out``, a bad ``max_batch_size`` or ``classifier``.
    """
    if max_batch_size < 1:
        raise TritonRepoError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    specs = [onnx_model_spec(onnx_path(out, model, p), model, p, max_batch_size)
             for p in GRAPH_PRECISIONS if onnx_path(out, model, p).is_file()]
    specs += [engine_model_spec(engine_path(out, model, p), model, out)
              for p in ENGINE_PRECISIONS if engine_path(out, model, p).is_file()]
    if not specs:
        raise TritonRepoError(f"no ONNX graph or engine of {model} in {out}: make them first with "
                              f"`make onnx MODEL={model}` (and `make calib` / `make engine`), or point OUT= at them")
    configs = {(s.data_config, s.class_names and tuple(s.class_names)) for s in specs}
    if len(configs) > 1:
        raise TritonRepoError(f"the artifacts in {out} disagree on preprocessing or classes ({len(configs)} "
                              f"variants): they come from different exports; re-export them together")
    by_name = {s.name: s for s in specs}
    if classifier:
        if classifier not in by_name:
            raise TritonRepoError(f"--classifier {classifier!r}: the repository has {', '.join(by_name)}")
        target = by_name[classifier]
    else:
        engines = [s for s in specs if s.platform == "tensorrt_plan"]
        fp32 = by_name.get(f"{model}-onnx-fp32")
        target = engines[0] if engines else (fp32 or specs[0])
    return RepoPlan(model, out, specs, target)


def _write_model(folder: Path, config: Any, files: dict[str, Any]) -> None:
    """``config.pbtxt`` and ``files`` (name -> Path to copy into version 1, str text, or dict JSON)."""
    from google.protobuf import text_format

    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
    for name, what in files.items():
        dest = folder / name
        if isinstance(what, Path):
            shutil.copyfile(what, dest)
        elif isinstance(what, dict):
            dest.write_text(json.dumps(what, indent=2) + "\n")
        else:
            dest.write_text(what)


def write_repository(plan: RepoPlan, dest: Path, instances: int = 1, queue_delay_us: int = 2000) -> list[str]:
    """Write the repository to ``dest`` whole or not at all (built in a sibling folder, then renamed).

    Returns the model names written.
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for spec in plan.classifiers:
            _write_model(tmp / spec.name, classifier_config(spec, instances, queue_delay_us),
                         {f"1/{spec.filename}": spec.artifact, "labels.txt": _labels(spec), **spec.extra_files})
        target = plan.ensemble_target
        _write_model(tmp / plan.preprocess_name, preprocess_config(plan.preprocess_name, target, instances),
                     {"1/model.py": PREPROCESS_SOURCE})
        _write_model(tmp / plan.ensemble_name, ensemble_config(plan.ensemble_name, plan.preprocess_name, target),
                     {"labels.txt": _labels(target)})
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.name for p in dest.iterdir() if p.is_dir())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(TOOL, add_help=add_help, description="A Triton model repository from a model's "
                                "ONNX graphs and engines -> <out>/triton/")
    p.add_argument("--model", required=True, help="registered model name whose artifacts are in --out")
    p.add_argument("--out", default=None, help="artifact folder (default artifacts/<model>); writes <out>/triton/")
    p.add_argument("--repo", default=None, help="repository folder (default <out>/triton)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="max_batch_size of the ONNX Runtime models (default 32; engines: their profile's maximum)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="dynamic batching: how long Triton may hold a request to form a batch (default 2000)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count per model (default 1)")
    p.add_argument("--classifier", default=None,
                   help="the model the <model>-classify ensemble runs (default: the engine, else <model>-onnx-fp32)")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.model)
    if args.instances < 1 or args.max_queue_delay_us < 0:
        raise TritonRepoError("--instances must be >= 1 and --max-queue-delay-us >= 0")
    plan = plan_repository(args.model, out, args.max_batch_size, args.classifier)
    dest = Path(args.repo) if args.repo else out / "triton"
    names = write_repository(plan, dest, args.instances, args.max_queue_delay_us)
    print(f"{dest}/: {', '.join(names)} (ensemble {plan.ensemble_name} -> {plan.ensemble_target.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return parse_and_run(get_args_parser, run, TOOL, argv)


if __name__ == "__main__":
    sys.exit(main())
