"""Calibrate and quantize an exported T2T-ViT to an int8 (or fp8) Q/DQ ONNX graph, and measure what it costs.

``make calib MODEL=t2t_vit_7 CHECKPOINT=... CALIB_DATA=/data/imagenet/train`` ::

    python -m calibration.calib --model t2t_vit_7 --checkpoint ckpt.pth --out artifacts/t2t_vit_7 \\
        --calib-data /data/imagenette2/train --val-data /data/imagenette2/val --method entropy,percentile,max

1. reads ``<out>/<model>.fp32.onnx`` and its data config from the ONNX metadata; a missing graph, or one made
   from another model, precision or checkpoint, is refused with the ``make onnx`` command that makes it
   (calibration never exports: the export's validation and report are ``make onnx``'s);
2. selects ``--calib-size`` images (seeded, class-balanced), preprocesses them with the model's eval
   transform through :class:`t2t_vit.data.ImageBatcher` and caches the tensor under ``<out>/``;
3. for each method: calibrates with onnxruntime.quantization (range cache kept under ``<out>/``),
   quantizes the policy's MatMul/Gemm inputs (:mod:`calibration.policy`): for ``--target tensorrt``
   (default) in the export's own fp16 graph ``<out>/<model>.fp16.onnx`` (its fp32 Performer core and
   LayerNorm precision as the recorded recipe, :class:`export.settings.ExportSettings`, chose them), or,
   for ``--target cpu``, in the fp32 graph (the form ONNX Runtime's CPU provider
   fuses into integer kernels); checks the Q/DQ pattern and writes ``<out>/<model>.int8.onnx`` (cpu:
   ``.int8-cpu.onnx``) for the first method and ``<out>/<model>.int8[-cpu]-<method>.onnx`` for the others;
4. evaluates fp32, fp16 and every int8 graph on ONNX Runtime CPU on the labeled ``--val-data`` images
   (decoded once) and writes ``<out>/<model>.calib.{json,md}`` (cpu: ``.calib-cpu.{json,md}``);
5. optionally (``--sensitivity stage|family``) quantizes one group at a time and reports its top-1 drop;
6. exits 1 when the int8 top-1 drop exceeds ``--max-drop`` points.

``--precision fp8`` (``make calib PRECISION=fp8``) does the same for ``<out>/<model>.fp8.onnx``: the TensorRT
int8 graph's placement and ranges with float8e4m3fn Q/DQ (:mod:`calibration.fp8`), for SM 8.9+ GPUs, its report
``<out>/<model>.calib-fp8.{json,md}`` with the FP8 attention pattern of every softmax attention
(:mod:`calibration.mha_pattern`).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from export.patterns import LAYERNORM_PRECISIONS
from export.settings import ExportSettings
from t2t_vit.artifacts import default_out, onnx_path
from t2t_vit.cli import add_run_args, add_stage_args, apply_threads, once_per_line, run_command
from t2t_vit.data import DataConfig, DataError, ImageBatcher
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, file_sha256
from t2t_vit.graphs import expect_graph, read_metadata, recorded_checkpoint
from t2t_vit.metrics import accuracy, compare_logits
from t2t_vit.reports import host_line, markdown_table, report_header, write_report

from .data import folder_label_space, load_or_preprocess, select_samples
from .evaluate import evaluate_graphs
from .mha_pattern import mha_patterns, summarize_patterns
from .policy import DEFAULT_POLICY, POLICIES, Placement, group_nodes
from .quantize import FP32_ISLAND_REASON, METHODS, QTYPES, TARGETS, TensorDataReader, build_qdq, ensure_opset, graph_precision

_logger = logging.getLogger("calibration")

__all__ = ["CalibrationError", "AccuracyDropError", "get_args_parser", "run", "render_markdown", "main"]


class CalibrationError(T2TError, RuntimeError):
    """A calibration run that cannot go on (missing export, no validation data)."""


class AccuracyDropError(ThresholdMissed):
    """The int8 graph lost more top-1 than allowed (the graphs and reports were written)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="INT8 Q/DQ calibration and accuracy check on ONNX Runtime CPU",
                                add_help=add_help)
    add_stage_args(p, checkpoint_help="weights the fp32 graph must have been exported from (checked against its "
                                       "metadata; export it with `make onnx` first)")
    add_run_args(p, batch_size=32, workers=2)
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-data", required=True, help="ImageFolder tree of calibration images (e.g. imagenet/train)")
    g.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024)")
    g.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    g.add_argument("--method", default="entropy",
                   help="calibration method(s), comma separated: entropy, percentile, max, or 'all' "
                        "(default entropy; the first one writes <model>.int8.onnx)")
    g.add_argument("--percentile", type=float, default=99.99, help="percentile for --method percentile (default 99.99)")
    g.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                   help=f"placement policy (default {DEFAULT_POLICY}; see calibration/policy.py)")
    g.add_argument("--exclude-t2t", action="store_true",
                   help="keep the whole T2T stage unquantized (fp16 for TensorRT, fp32 for the CPU target)")
    g.add_argument("--precision", choices=QTYPES, default="int8",
                   help="int8 (default), or fp8: <model>.fp8.onnx, the TensorRT int8 graph's placement with float8e4m3fn "
                        "Q/DQ (scales amax/448) for SM 8.9+ GPUs (make calib PRECISION=fp8; TensorRT target only)")
    g.add_argument("--target", choices=TARGETS, default="tensorrt",
                   help="tensorrt (default): <model>.int8.onnx, fp16 outside the Q/DQ layers, for strongly typed "
                        "TensorRT; cpu: <model>.int8-cpu.onnx, the same Q/DQ over fp32, which ONNX Runtime's CPU "
                        "provider runs with integer kernels (make calib TARGET=cpu)")
    g.add_argument("--layernorm-precision", choices=LAYERNORM_PRECISIONS, default=None,
                   help="LayerNorms of the TensorRT int8 graph: they are the fp16 export's (its recorded recipe); a "
                        "different value here is refused with the make onnx that gives it (the CPU target is fp32)")
    g.add_argument("--val-data", default=None,
                   help="labeled ImageFolder tree for accuracy (default: the 'val' folder beside --calib-data)")
    g.add_argument("--val-size", type=int, default=None, help="class-balanced subset of the validation images (default all)")
    g.add_argument("--no-eval", action="store_true", help="quantize only: no accuracy report, no threshold check")
    g.add_argument("--max-drop", type=float, default=1.0,
                   help="fail when int8 top-1 is more than this many points below fp32 (default 1.0)")
    g.add_argument("--sensitivity", choices=("stage", "family"), default=None,
                   help="also quantize one group at a time (per block or per op family) and report each top-1 drop")
    g.add_argument("--report", default=None,
                   help="also write the report here: a file stem (reports/calib-imagenette-t2t_vit_7) or a folder")
    return p


def _methods(spec: str) -> list[str]:
    names = list(METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise CalibrationError(f"unknown calibration method(s) {bad or spec!r}; choose from {list(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def ensure_fp32_onnx(args: argparse.Namespace, out: Path) -> Path:
    """``<out>/<model>.fp32.onnx``, checked to be this model's fp32 graph and, with --checkpoint, made from
    that checkpoint (:func:`t2t_vit.graphs.expect_graph`).

    Calibration never exports: ``make onnx`` validates the graphs it writes and records that in its export
    report, and an export made here would have to skip that validation (or replace the report). A missing
    or stale graph is refused with the ``make onnx`` command that makes the right one.

    Raises:
        GraphError: missing, unreadable, or another model's, precision's or checkpoint's graph.
    """
    path = onnx_path(out, args.model, "fp32")
    checkpoint = args.checkpoint
    expect_graph(path, model=args.model, precision="fp32", checkpoint=checkpoint,
                 checkpoint_sha=file_sha256(checkpoint) if checkpoint else None,
                 out=out)
    return path


def _fp16_export(args: argparse.Namespace, out: Path, meta: dict[str, str]) -> onnx.ModelProto | None:
    """The TensorRT target's starting point, ``<out>/<model>.fp16.onnx`` (the export's fp16 graph, which the int8
    graph keeps whole: its fp32 island and LayerNorm precision); None for the CPU target. The export's recipe
    decides the LayerNorm precision: ``--layernorm-precision`` may only restate it."""
    if args.target == "cpu":
        if args.layernorm_precision not in (None, "fp32"):
            _logger.warning("--layernorm-precision %s is ignored for --target cpu: that graph computes everything, "
                            "LayerNorms included, in fp32", args.layernorm_precision)
        return None
    recipe = ExportSettings.from_metadata(meta, source=str(onnx_path(out, args.model, "fp32")))
    if args.layernorm_precision not in (None, recipe.layernorm):
        raise CalibrationError(f"--layernorm-precision {args.layernorm_precision}: the int8 graph keeps the "
                               f"export's LayerNorms ({recipe.layernorm}); re-export with `make onnx "
                               f"ARGS=\"--layernorm-precision {args.layernorm_precision}\"` and calibrate again")
    path = onnx_path(out, args.model, "fp16")
    if not path.is_file():
        raise CalibrationError(f"{path} does not exist: the TensorRT int8 graph is the export's fp16 graph with Q/DQ; "
                               f"run `make onnx` (it writes both graphs)")
    return onnx.load(str(path))


def _smallest_activation(fp32_path: Path, policy: str, exclude_t2t: bool) -> tuple[str, int]:
    """The policy's calibrated activation with the fewest values per image: (tensor, values per image)."""
    model = ensure_opset(onnx.load(str(fp32_path)))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    weights = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    sizes = {}
    for name in Placement.from_model(model, policy, exclude_t2t).node_names:
        for t in by_name[name].input[:2]:
            dims = shapes.get(t)
            if t not in weights and dims and all(d for d in dims[1:]):
                sizes[t] = int(np.prod(dims[1:]))  # the batch axis is the first
    return min(sizes.items(), key=lambda kv: kv[1]) if sizes else ("", 0)


def _check_percentile_size(fp32_path: Path, args: argparse.Namespace, n_images: int) -> None:
    """Percentile calibration clips each tensor at its ``--percentile``; with fewer than 1 / (1 - p/100) values in
    a tensor that percentile is its maximum (the method degenerates to max). Refuse a calibration set that small
    for the policy's smallest calibrated tensor (for t2t_vit the head's input, one token).

    Raises:
        CalibrationError: CALIB_SIZE too small for the percentile (one line naming the fixes).
    """
    if not 0 < args.percentile < 100:
        raise CalibrationError(f"--percentile must be in (0, 100), got {args.percentile}")
    tensor, per_image = _smallest_activation(fp32_path, args.policy, args.exclude_t2t)
    need = math.ceil(1 / (1 - args.percentile / 100) - 1e-9)
    if per_image and n_images * per_image < need:
        images = math.ceil(need / per_image)
        raise CalibrationError(
            f"CALIB_SIZE (--calib-size) {n_images} is too small for --method percentile {args.percentile:g}: its "
            f"smallest calibrated tensor ({tensor}, {per_image} values per image) needs {need} values, i.e. "
            f"{images} images, for that percentile to lie below the maximum; use CALIB_SIZE>={images}, a lower "
            f"--percentile, or --method max")


def _default_val(calib_data: Path) -> Path | None:
    cand = calib_data.parent / "val"
    return cand if cand.is_dir() and cand.resolve() != calib_data.resolve() else None


def _range_cache(out: Path, model: str, method: str, fp32_sha: str, data_key: str, percentile: float) -> Path:
    import hashlib

    key = hashlib.sha256(f"{fp32_sha}|{data_key}|{method}|{percentile}".encode()).hexdigest()[:16]
    return out / "calib-cache" / f"{model}.ranges-{method}-{key}.json"


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole calibration run; returns the report (also written to ``<out>/<model>.calib[-cpu].{json,md}``)."""
    out = Path(args.out) if args.out else default_out(args.model)
    with OutputLock(out):
        return _run(args, argv, out)


@dataclass(frozen=True)
class CalibPlan:
    """What a run reads and where it writes, settled (and bad input refused) before anything is computed."""

    out: Path
    stem: str  # <model>.calib, <model>.calib-cpu or <model>.calib-fp8: the report's file stem under out
    precision: str  # the graphs' precision name: int8, int8-cpu or fp8
    threads: int
    methods: list[str]  # the first one writes <model>.int8[-cpu].onnx
    calib_root: Path
    samples: list[Any]  # the selected calibration images
    val_root: Path | None
    fp32_path: Path
    meta: dict[str, str]  # the fp32 graph's metadata
    fp16_model: onnx.ModelProto | None  # the TensorRT target's starting graph; None for the CPU target
    config: DataConfig  # preprocessing, as the export recorded it
    fp32_sha: str


@dataclass(frozen=True)
class CalibGraphs:
    """The graphs a run wrote: one int8 graph per method and, with --sensitivity, one per group."""

    cached: Any  # the calibration tensor (calibration.data.load_or_preprocess)
    placement: Placement
    int8: dict[str, dict[str, Any]]  # method -> build_qdq's record (int8 or fp8 graphs)
    groups: dict[str, list[Any]]  # sensitivity group -> its nodes
    sens_graphs: dict[str, Path]  # sensitivity group -> its graph


def _run(args: argparse.Namespace, argv: Sequence[str] | None, out: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    plan = plan_calibration(args, out)
    graphs = build_graphs(args, plan)
    report = calib_report(args, argv, plan, graphs)
    if not args.no_eval:
        report.update(evaluate_accuracy(args, plan, graphs))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(args, plan, report)
    return report


def plan_calibration(args: argparse.Namespace, out: Path) -> CalibPlan:
    """Check every input (methods, the calibration and validation folders, the exported graphs) before any
    image is decoded or graph written.

    Raises:
        CalibrationError, DataError, GraphError: bad flags, folders or graphs (one line each, exit 2).
    """
    threads = apply_threads(args.threads)
    methods = _methods(args.method)
    precision = graph_precision(args.target, args.precision)  # fp8 for the CPU target: refused here
    calib_root = Path(args.calib_data)
    # The calibration images first: a missing or empty CALIB_DATA is that, not a missing val folder.
    if not calib_root.is_dir():
        raise CalibrationError(f"CALIB_DATA (--calib-data) {calib_root} is not a folder; point it at an ImageFolder "
                               f"tree of calibration images, e.g. CALIB_DATA=../shared/data/imagenette2/train")
    if args.calib_size <= 0:  # a bad count is not a problem of the folder: no CALIB_DATA prefix
        raise DataError(f"CALIB_SIZE (--calib-size) must be a positive number of images, got {args.calib_size}")
    try:
        samples = select_samples(calib_root, args.calib_size, args.seed, what="CALIB_SIZE (--calib-size)")
    except DataError as e:
        raise DataError(f"CALIB_DATA (--calib-data): {e}") from e
    val_root = Path(args.val_data) if args.val_data else _default_val(calib_root)
    if not args.no_eval and val_root is None:
        raise CalibrationError(
            f"no labeled validation folder for the accuracy check: pass --val-data (ARGS=\"--val-data DIR\"; there "
            f"is no 'val' folder beside CALIB_DATA {calib_root}), or --no-eval to quantize without it")
    fp32_path = ensure_fp32_onnx(args, out)
    if "percentile" in methods:
        _check_percentile_size(fp32_path, args, len(samples))
    meta = read_metadata(fp32_path)
    fp16_path = onnx_path(out, args.model, "fp16")
    if not args.no_eval and fp16_path.is_file():  # its column must compare the fp32 graph's weights in fp16
        expect_graph(fp16_path, model=args.model, precision="fp16", checkpoint_sha=recorded_checkpoint(meta),
                     against=f"the fp32 graph {fp32_path}", checkpoint=args.checkpoint, out=out)
    fp16_model = _fp16_export(args, out, meta)
    return CalibPlan(
        out=out, stem=f"{args.model}.calib" + {"int8": "", "int8-cpu": "-cpu", "fp8": "-fp8"}[precision],
        precision=precision, threads=threads,
        methods=methods, calib_root=calib_root, samples=samples, val_root=val_root, fp32_path=fp32_path, meta=meta,
        fp16_model=fp16_model, config=DataConfig.from_metadata(meta),  # preprocessing is recorded, never guessed
        fp32_sha=file_sha256(fp32_path))


def build_graphs(args: argparse.Namespace, plan: CalibPlan) -> CalibGraphs:
    """Preprocess (or load the cached) calibration images, place the Q/DQ nodes, and write one int8 graph per
    method and, with --sensitivity, one graph per group (the first method's ranges)."""
    # 1. calibration images (cached)
    cached = load_or_preprocess(plan.samples, plan.config, plan.out / "calib-cache", prefix=f"calib-{args.model}",
                                batch_size=args.batch_size, num_workers=args.workers,
                                progress=not args.no_progress)
    print(f"calibration set: {len(cached.paths)} images from {plan.calib_root} "
          f"({'cache hit' if cached.from_cache else 'decoded and cached'}: {cached.cache_path})", flush=True)

    # 2. placement
    fp32_model = ensure_opset(onnx.load(str(plan.fp32_path)))
    placement = Placement.from_model(fp32_model, args.policy, args.exclude_t2t)
    print(placement.describe("fp32" if args.target == "cpu" else "fp16", nodes=False)
          + f"\n  every node: 'placement' in {plan.out / (plan.stem + '.json')}", flush=True)
    reader = TensorDataReader(cached.images.numpy(), input_name=fp32_model.graph.input[0].name)

    # 3. one int8 graph per method
    data_key = cached.cache_path.stem.rsplit("-", 1)[-1]
    int8: dict[str, dict[str, Any]] = {}
    for i, method in enumerate(plan.methods):
        base = plan.precision
        path = onnx_path(plan.out, args.model, base if i == 0 else f"{base}-{method}")
        cache = _range_cache(plan.out, args.model, method, plan.fp32_sha, data_key, args.percentile)
        info = {"calib_policy": args.policy, "calib_exclude_t2t": str(args.exclude_t2t).lower(),
                "calib_size": str(len(cached.paths)), "calib_data_key": data_key}
        print(f"[{method}] calibrating and quantizing {len(placement.node_names)} nodes -> {path}", flush=True)
        with once_per_line("onnxruntime"):  # its histogram line, once per stride
            int8[method] = build_qdq(fp32_model, placement, method, reader, path, target=args.target,
                                     fp16_model=plan.fp16_model, cache=cache, percentile=args.percentile, meta=info,
                                     qtype=args.precision)
        print(f"[{method}] Q/DQ pattern ok: {int8[method]['qdq_check']}", flush=True)

    # 4. sensitivity graphs (first method's ranges, one group quantized at a time)
    sens_graphs: dict[str, Path] = {}
    groups = {}
    if args.sensitivity:
        groups = group_nodes(placement.quantized, args.sensitivity)
        method = plan.methods[0]
        cache = _range_cache(plan.out, args.model, method, plan.fp32_sha, data_key, args.percentile)
        for g, cands in groups.items():
            path = plan.out / "sensitivity" / f"{args.model}.{plan.precision}-{method}-only-{g}.onnx"
            build_qdq(fp32_model, [c.name for c in cands], method, reader, path, target=args.target,
                      fp16_model=plan.fp16_model, cache=cache, percentile=args.percentile,
                      meta={"sensitivity_group": g}, qtype=args.precision)
            sens_graphs[g] = path
    return CalibGraphs(cached=cached, placement=placement, int8=int8, groups=groups, sens_graphs=sens_graphs)


def calib_report(args: argparse.Namespace, argv: Sequence[str] | None, plan: CalibPlan,
                 graphs: CalibGraphs) -> dict[str, Any]:
    """The report's inputs, placement and int8 graphs (the accuracy comes from :func:`evaluate_accuracy`)."""
    cached, int8 = graphs.cached, graphs.int8
    report: dict[str, Any] = {
        **report_header("calibration.calib", argv),
        "model": args.model,
        "target": args.target,
        "qtype": args.precision,
        "precision": plan.precision,
        "threads": plan.threads,
        "fp32_onnx": str(plan.fp32_path),
        "fp32_sha256": plan.fp32_sha,
        "metadata": {k: plan.meta.get(k) for k in ("model", "num_classes", "checkpoint_sha256", "img_size")},
        "calibration": {"data": str(plan.calib_root), "size": len(cached.paths), "seed": args.seed,
                        "cache": str(cached.cache_path), "cache_hit": cached.from_cache,
                        "methods": plan.methods, "percentile": args.percentile},
        "placement": graphs.placement.as_dict(),
        args.precision: int8,
        "max_drop": args.max_drop,
    }
    first = int8[plan.methods[0]]["fp32_island"]
    report["fp32_island"] = {"pattern": first["pattern"], "nodes": len(first["nodes"]),
                             "reason": FP32_ISLAND_REASON if first["nodes"] else "",
                             "layernorm_precision": int8[plan.methods[0]]["layernorm_precision"],
                             "note": f"the same island in every {args.precision} graph of this report; the node and "
                                     f"tensor lists are under {args.precision}.<method>.fp32_island"}
    if args.precision == "fp8":  # the attention pattern TensorRT's FP8 MHA fusion needs (docs/fp8.md)
        report["attention"] = summarize_patterns(mha_patterns(onnx.load(int8[plan.methods[0]]["path"])))
    return report


def evaluate_accuracy(args: argparse.Namespace, plan: CalibPlan, graphs: CalibGraphs) -> dict[str, Any]:
    """Top-1/top-5 of fp32, fp16, every int8 and every sensitivity graph on ONNX Runtime CPU over the labeled
    validation images (decoded once): the report's ``validation``, ``accuracy``, ``sensitivity`` and
    ``primary`` entries."""
    onnx_graphs: dict[str, Path] = {"fp32": plan.fp32_path}
    fp16_path = onnx_path(plan.out, args.model, "fp16")
    if fp16_path.is_file():  # checked at the start
        onnx_graphs["fp16"] = fp16_path
    else:
        print(f"note: {fp16_path} not found; the fp16 column is skipped", flush=True)
    for m, r in graphs.int8.items():
        onnx_graphs[f"{args.precision}-{m}"] = Path(r["path"])
    for g, p in graphs.sens_graphs.items():
        onnx_graphs[f"only:{g}"] = p
    val_samples = select_samples(plan.val_root, args.val_size, args.seed,
                                 class_to_idx=folder_label_space(plan.meta, plan.val_root), strict=False,
                                 what="--val-size")
    batcher = ImageBatcher(val_samples, plan.config, batch_size=args.batch_size, num_workers=args.workers)
    logits, labels = evaluate_graphs({k: str(v) for k, v in onnx_graphs.items()}, batcher, threads=plan.threads,
                                     total=len(batcher), progress=not args.no_progress)
    ref = logits["fp32"]
    acc = {k: accuracy(v, labels) if k == "fp32" else compare_logits(ref, v, labels) for k, v in logits.items()}
    for k, v in acc.items():
        if k != "fp32":
            v["top1_drop"] = acc["fp32"]["top1"] - v["top1"]
    report: dict[str, Any] = {
        "validation": {"data": str(plan.val_root), "images": int(len(labels)), "skipped": len(batcher.skipped)},
        "accuracy": {k: v for k, v in acc.items() if not k.startswith("only:")},
    }
    if graphs.sens_graphs:
        report["sensitivity"] = {
            "grouping": args.sensitivity, "method": plan.methods[0],
            "groups": {g: {"nodes": len(graphs.groups[g]), "top1": acc[f"only:{g}"]["top1"],
                           "top1_drop": acc[f"only:{g}"]["top1_drop"],
                           "top1_agreement": acc[f"only:{g}"]["top1_agreement"]} for g in graphs.sens_graphs},
        }
    primary = f"{args.precision}-{plan.methods[0]}"
    report["primary"] = {"graph": str(onnx_path(plan.out, args.model, plan.precision)),
                         "target": args.target, "method": plan.methods[0],
                         "top1_drop": acc[primary]["top1_drop"], "passed": acc[primary]["top1_drop"] <= args.max_drop}
    return report


def write_outputs(args: argparse.Namespace, plan: CalibPlan, report: dict[str, Any]) -> None:
    """Write the report (``<out>/<stem>.{json,md}`` and --report's copy), print it, and fail on --max-drop.

    Raises:
        AccuracyDropError: the primary int8 graph lost more top-1 than --max-drop (exit 1; everything written).
    """
    md = render_markdown(report)
    targets = [plan.out / plan.stem]
    if args.report:
        rp = Path(args.report)
        targets.append(rp / plan.stem if args.report.endswith("/") or rp.is_dir() else rp)
    for stem in targets:
        write_report(stem, report, md)
    print(md, flush=True)
    if "primary" in report and not report["primary"]["passed"]:
        raise AccuracyDropError(
            f"{args.precision} top-1 dropped {report['primary']['top1_drop']:.2f} points ({plan.methods[0]} calibration), more "
            f"than --max-drop {args.max_drop}; try another --method (percentile, max), --exclude-t2t, a narrower "
            f"--policy, or --sensitivity stage to find the layers to keep in fp16. Report: {targets[0]}.md"
        )


def render_markdown(r: dict[str, Any]) -> str:
    cal = r["calibration"]
    pl = r["placement"]
    cpu = r.get("target") == "cpu"
    qtype = r.get("qtype", "int8")
    lines = [f"# {qtype.upper()} calibration: {r['model']}" + (" (CPU target: ONNX Runtime integer kernels)" if cpu else
                                                               " (float8e4m3fn Q/DQ, scales amax/448, SM 8.9+ GPUs)"
                                                               if qtype == "fp8" else ""), "",
             f"`{r['command']}`", "",
             f"Calibration: {cal['size']} images from `{cal['data']}` (seed {cal['seed']}, class-balanced), "
             f"methods {', '.join(cal['methods'])} (percentile {cal['percentile']}). "
             f"Policy `{pl['policy']}`{' with the T2T stage excluded' if pl['exclude_t2t'] else ''}: "
             f"{len(pl['quantized'])} MatMul/Gemm nodes quantized "
             f"({', '.join(f'{k} {v}' for k, v in sorted(pl['summary']['by_family'].items()))}), "
             f"{len(pl['kept_float'])} kept {'fp32' if cpu else 'fp16'}; everything else "
             f"{'fp32 (the graph ONNX Runtime CPU fuses into MatMulIntegerToFloat)' if cpu else 'fp16'}", ""]
    isl = r.get("fp32_island", {})
    if isl.get("nodes"):
        lines[-2] += (f" except the fp32 island: the Performer's linear-attention core ({isl['nodes']} nodes, "
                      f"`{isl['pattern']}`, the same island as the fp16 graph) stays float32 behind Casts. "
                      f"Why: {isl['reason']}.")
    else:
        lines[-2] += "."
    if not cpu and isl.get("layernorm_precision") == "fp32":
        lines[-2] += (" LayerNorms compute in fp32 behind Casts (the default, `--layernorm-precision fp16` opts out): "
                      "see docs/precision.md.")
    if "accuracy" in r:
        v = r["validation"]
        lines += [f"ONNX Runtime CPU, {r.get('threads')} threads, {v['images']} labeled images from `{v['data']}`. "
                  f"Host: {host_line(r['host'])}.", ""]
        rows = []
        for k, a in r["accuracy"].items():
            rows.append([k, a["top1"], a["top5"], a.get("top1_drop", 0.0) if k != "fp32" else "-",
                         a.get("top1_agreement", "-"), a.get("mean_abs_dlogit", "-"), a.get("max_abs_dlogit", "-")])
        lines += [markdown_table(["graph", "top-1 %", "top-5 %", "top-1 drop", "top-1 agreement with fp32 %",
                                  "mean abs dlogit", "max abs dlogit"], rows), ""]
        p = r["primary"]
        lines += [f"`{Path(p['graph']).name}` ({p['method']}): top-1 drop {p['top1_drop']:.2f} points, "
                  f"threshold {r['max_drop']}: **{'PASS' if p['passed'] else 'FAIL'}**", ""]
    if "sensitivity" in r:
        s = r["sensitivity"]
        lines += [f"## Sensitivity (one {s['grouping']} quantized at a time, {s['method']} ranges)", ""]
        rows = [[g, v["nodes"], v["top1"], v["top1_drop"], v["top1_agreement"]] for g, v in s["groups"].items()]
        lines += [markdown_table([s["grouping"], "nodes", "top-1 %", "top-1 drop", "agreement %"], rows), ""]
    lines += [f"Q/DQ checks ({'ONNX Runtime CPU' if cpu else 'TensorRT'} pattern): " + "; ".join(
        f"{m}: {i['qdq_check']['weight_dq']} per-channel {qtype} weights, {i['qdq_check']['activation_qdq']} "
        f"per-tensor activation Q/DQ" for m, i in r[qtype].items()), ""]
    if "attention" in r:
        a = r["attention"]
        lines += [f"FP8 attention pattern (TensorRT's FP8 MHA fusion, docs/fp8.md): {a['fp8_fusable']} of "
                  f"{a['attentions']} softmax attentions fusable, {a['dq_direct']} with every DQ feeding its MatMul "
                  f"directly; attention scale on {', '.join(a['scale']) or '-'}; head sizes "
                  f"{', '.join(map(str, a['head_sizes'])) or '-'}"
                  + (f"; problems: {a['problems']}" if a["problems"] else "") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: run(args, argv) and 0, "calibration.calib")


if __name__ == "__main__":
    sys.exit(main())
