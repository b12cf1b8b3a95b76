"""fp32 ONNX + calibration tensor -> int8 Q/DQ ONNX with fp16 everywhere else (what strongly typed
TensorRT builds).

The work is done by ``onnxruntime.quantization.quantize_static`` (QDQ format, symmetric int8 activations
and weights, per-channel weights, per-tensor activations, zero point 0, Entropy / Percentile / MinMax
calibration). The steps added here are:

1. the placement policy (:mod:`calibration.policy`) chooses ``nodes_to_quantize``;
2. calibration ranges are computed once per method and kept in ORT's calibration cache file, so the
   sensitivity sweep re-quantizes without re-running calibration;
3. the TensorRT graph is the export's own fp16 graph with Q/DQ (:func:`quantize_fp16_export`): the same
   ranges, renamed to its tensors, typed float16 so the Q/DQ scales are fp16 (opset >= 19) and every
   DequantizeLinear feeds an fp16 MatMul. Everything else is the export's: fp16 where it computes in fp16
   (LayerNorm, Softmax, GELU, Adds, as TensorRT runs them), and fp32 where its recipe (read back from the
   graphs by :func:`export_recipe`) keeps fp32: its LayerNorm precision, and its fp32 island, each Performer's
   linear-attention core (:func:`calibration.policy.performer_core_nodes`; feature MatMuls with ``w``,
   ReduceMax/Exp/ReduceSum, the normaliser, the rescaled epsilon, the division), because an fp16 core is
   measurably wrong (``FP32_ISLAND_REASON``). Nothing is converted or rebuilt here;
4. :func:`check_qdq` asserts the pattern TensorRT accepts, and that the island is there.

:func:`build_qdq` chains the steps for a target (``tensorrt``: the mixed fp16 graph above; ``cpu``: the same
Q/DQ over fp32, for ONNX Runtime's integer kernels), checks the result and writes it with its metadata: the
one way every stage (``make calib``, its sensitivity sweep, the CPU benchmarks) makes an int8 graph.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from export.patterns import FP32_ISLAND_REASON, fp32_tensor_reasons
from export.settings import ExportSettings
from t2t_vit.errors import T2TError
from t2t_vit.files import atomic_save_onnx
from t2t_vit.graphs import (check_graph, consumers, default_opset, describe_graph, fp32_tensors, producers,
                            set_metadata, toposort, value_types)

from .fp8 import to_fp8
from .policy import NEVER_QUANTIZED_OPS, Placement, classify_nodes, performer_core_nodes

_logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "TARGETS",
    "TARGET_PRECISION",
    "QuantizationError",
    "TensorDataReader",
    "build_qdq",
    "graph_precision",
    "GRAPH_PRECISION",
    "QTYPES",
    "FP8_MIN_COMPUTE_CAPABILITY",
    "int8_metadata",
    "export_recipe",
    "ensure_opset",
    "quiet_onnxruntime",
    "quantize_model",
    "matmul_pairs",
    "quantize_fp16_export",
    "to_cpu_int8",
    "fp32_island",
    "FP32_ISLAND_REASON",
    "check_qdq",
]

# CLI name -> onnxruntime CalibrationMethod attribute name.
METHODS = {"entropy": "Entropy", "percentile": "Percentile", "max": "MinMax"}
MIN_OPSET = 19  # fp16 scales on QuantizeLinear/DequantizeLinear need opset 19
TARGETS = ("tensorrt", "cpu")
QTYPES = ("int8", "fp8")  # the quantized type of the Q/DQ layers (fp8: float8e4m3fn, calibration.fp8)
# The int8 graph each target gets: TensorRT's (fp16 everywhere but the Q/DQ layers and the fp32 island) or
# ONNX Runtime CPU's (the same Q/DQ placement over fp32, which ORT fuses into MatMulIntegerToFloat).
TARGET_PRECISION = {"tensorrt": "int8", "cpu": "int8-cpu"}
# The graph precision (artifact name) of each (target, qtype); fp8 is TensorRT's only (ONNX Runtime's CPU
# provider has no fp8 MatMul: it runs the TensorRT graph's Q/DQ as an emulation, parity's onnxruntime-cpu-fp8).
GRAPH_PRECISION = {("tensorrt", "int8"): "int8", ("cpu", "int8"): "int8-cpu", ("tensorrt", "fp8"): "fp8"}
# FP8 Q/DQ runs on SM 8.9 (Ada) and later: TensorRT's support matrix lists FP8 for compute capability 8.9+.
FP8_MIN_COMPUTE_CAPABILITY = "8.9"
_ZERO_POINT_TYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


def graph_precision(target: str, qtype: str = "int8") -> str:
    """The precision name (``<model>.<precision>.onnx``) of the Q/DQ graph of ``target`` and ``qtype``.

    Raises:
        QuantizationError: a combination no runtime runs (fp8 for the CPU target).
    """
    if target not in TARGETS:
        raise QuantizationError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if qtype not in QTYPES:
        raise QuantizationError(f"unknown quantized type {qtype!r}; choose one of {list(QTYPES)}")
    if (target, qtype) not in GRAPH_PRECISION:
        raise QuantizationError("fp8 has one graph, TensorRT's (--target tensorrt): ONNX Runtime's CPU provider has "
                                "no fp8 kernels; it runs that graph's Q/DQ as an emulation (parity backend "
                                "onnxruntime-cpu-fp8)")
    return GRAPH_PRECISION[(target, qtype)]


class QuantizationError(T2TError, RuntimeError):
    """Quantization failed or produced a graph TensorRT would not accept; the message says why."""


class TensorDataReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a preprocessed (N, 3, H, W) tensor.

    One image per call by default, and ``set_range`` so onnxruntime can calibrate in strides
    (``CalibStridedMinMax``: ranges/histograms are merged after each stride, so memory holds one
    stride's intermediate tensors, not the whole set's: about 15 MB per 224-px t2t_vit_7 image).
    """

    def __init__(self, images: np.ndarray, input_name: str = "input", batch_size: int = 1):
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self._pos = 0
        self._end = len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict to batches ``start_index:end_index`` (onnxruntime's strided calibration)."""
        self._pos = start_index * self.batch_size
        self._end = min(end_index * self.batch_size, len(self.images))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        batch = self.images[self._pos: self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0
        self._end = len(self.images)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    # quantize_static type-checks for the ABC; register lazily so importing this module stays light.
    @classmethod
    def register(cls) -> None:
        from onnxruntime.quantization import CalibrationDataReader

        CalibrationDataReader.register(cls)


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> onnx.ModelProto:
    """The model at opset >= ``minimum`` (version-converted when older: Reduce*/Split changed at 18)."""
    if default_opset(model) >= minimum:
        return model
    from onnx import version_converter

    _logger.info("converting the graph from opset %d to %d (fp16 Q/DQ scales)", default_opset(model), minimum)
    converted = version_converter.convert_version(model, minimum)
    # version_converter drops metadata_props on some versions; keep them.
    if not converted.metadata_props:
        for p in model.metadata_props:
            converted.metadata_props.add(key=p.key, value=p.value)
    return converted


def _stride(n_batches: int, largest: int = 32) -> int:
    """Largest divisor of ``n_batches`` up to ``largest`` (onnxruntime requires strides to divide it)."""
    return max(d for d in range(1, min(largest, n_batches) + 1) if n_batches % d == 0)


def _extra_options(method: str, percentile: float, n_batches: int | None = None) -> dict:
    opts = {
        "ActivationSymmetric": True,  # zero point 0 for int8 activations (TensorRT: symmetric only)
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        # TensorRT takes float biases: an int32-quantized bias (ORT's default) is not a pattern it fuses.
        "QuantizeBias": False,
        # Only the policy's nodes consume DQ outputs: a tensor shared with a residual Add or the Performer's
        # exp path (v, split outputs) keeps its float route to those ops.
        "DedicatedQDQPair": True,
        # Q/DQ on MatMul/Gemm inputs only: outputs flow in fp16 into bias Adds, GELU, residuals.
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
    }
    if n_batches:
        # Bounded memory over large T2T activations: onnxruntime merges ranges (MinMax) or histograms
        # (Entropy, Percentile) after each stride. (Its CalibMaxIntermediateOutputs is ignored by the
        # histogram calibrators and drops data in MinMax in onnxruntime 1.32, so it is not used.)
        opts["CalibStridedMinMax"] = _stride(n_batches)
    if method == "percentile":
        opts["CalibPercentile"] = float(percentile)
    return opts


def quantize_model(fp32_model: onnx.ModelProto, nodes: Sequence[str], method: str, *,
                   reader: TensorDataReader | None = None, cache_path: str | os.PathLike | None = None,
                   percentile: float = 99.99) -> onnx.ModelProto:
    """Q/DQ-quantize ``nodes`` of an fp32 graph (still fp32 elsewhere) with onnxruntime.

    Args:
        fp32_model: the exported fp32 graph (opset >= 19 after :func:`ensure_opset`).
        nodes: names of the MatMul/Gemm nodes whose inputs get Q/DQ (from the policy).
        method: "entropy", "percentile" or "max".
        reader: calibration batches; may be None when ``cache_path`` already holds the ranges.
        cache_path: ORT calibration cache (JSON of tensor ranges) written on first use and reused.
        percentile: the percentile for ``method="percentile"``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose one of {sorted(METHODS)}")
    if not nodes:
        raise QuantizationError("the policy selected no node to quantize; check --policy / --exclude-t2t")
    if reader is None and (cache_path is None or not Path(cache_path).is_file()):
        raise QuantizationError("need calibration data (a reader) or an existing calibration cache file")
    TensorDataReader.register()
    if reader is not None:
        reader.rewind()
    with tempfile.TemporaryDirectory(prefix="t2t-calib-") as tmp, quiet_onnxruntime():
        src = Path(tmp) / "fp32.onnx"
        dst = Path(tmp) / "qdq.onnx"
        onnx.save(fp32_model, src)
        quantize_static(
            str(src), str(dst), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=list(nodes),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
            calibration_cache_path=str(cache_path) if cache_path is not None else None,
            extra_options=_extra_options(method, percentile, len(reader) if reader is not None else None),
        )
        return onnx.load(dst)


@contextlib.contextmanager
def quiet_onnxruntime(level: int = logging.ERROR) -> Iterator[None]:
    """Drop ONNX Runtime's own log records below ``level`` while the block runs (its pre-processing nag and
    per-tensor notes), and nothing else; everything is restored on exit.

    ``onnxruntime.quantization`` logs through the root logger (module-level ``logging.warning``), so no level
    on a named logger reaches those records, and a root level would silence every other logger too. A filter
    on the root logger sees only records logged on it directly, not the ones its children propagate: this one
    drops those whose source file is in the onnxruntime package. Its named loggers (``onnxruntime.*``) get
    ``level`` for the block as well.
    """
    import onnxruntime

    package = os.path.join(os.path.dirname(os.path.abspath(onnxruntime.__file__)), "")

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= level or not os.path.abspath(record.pathname).startswith(package)

    root, named = logging.getLogger(), logging.getLogger("onnxruntime")
    named_level = named.level
    root.addFilter(keep)
    named.setLevel(max(named_level, level))
    try:
        yield
    finally:
        root.removeFilter(keep)
        named.setLevel(named_level)


def build_qdq(fp32_model: onnx.ModelProto, placement: Placement | Sequence[str], method: str,
              reader: TensorDataReader | None, path: str | os.PathLike, *, target: str = "tensorrt",
              fp16_model: onnx.ModelProto | None = None, cache: str | os.PathLike | None = None,
              percentile: float = 99.99, meta: Mapping[str, Any] | None = None, qtype: str = "int8") -> dict[str, Any]:
    """An fp32 graph -> the checked Q/DQ graph of ``target`` and ``qtype``, with its metadata, written
    (atomically) to ``path``: the one way every stage makes an int8 or fp8 graph.

    1. :func:`quantize_model` on the placement's nodes of the fp32 graph (ranges read from ``cache`` when it
       holds them, else calibrated on ``reader`` and kept there);
    2. ``target="tensorrt"``: :func:`quantize_fp16_export`, the export's own fp16 graph (``fp16_model``) with
       Q/DQ from the same ranges: fp16 everywhere except what the export's recipe keeps fp32
       (:class:`export.settings.ExportSettings`, read from the metadata: the Performer's fp32 island when
       ``fp32_core``, the LayerNorms when ``layernorm`` is "fp32"); ``target="cpu"``: :func:`to_cpu_int8`,
       the Q/DQ graph over fp32, the form ONNX Runtime's CPU provider fuses into integer kernels
       (DequantizeLinear + MatMul -> MatMulIntegerToFloat; fp16 would make it insert Casts it cannot fuse);
    3. ``qtype="fp8"`` (TensorRT target only): :func:`calibration.fp8.to_fp8` rewrites every quantizer of that
       graph to float8e4m3fn, scales ``amax / 448`` from the same ranges and the fp16 export's weights;
    4. :func:`check_qdq` for the target's pattern (with the recipe's island and LayerNorms), and the full ONNX
       checker (:func:`t2t_vit.graphs.check_graph`);
    5. metadata: the fp32 graph's (its recipe included), the calibration method, ``meta``, the percentile,
       the node count, the float type, ``precision`` (``TARGET_PRECISION``) and ``target``, then what the
       graph itself says (:func:`t2t_vit.graphs.describe_graph`: opset, fp32 islands, LayerNorm type).

    Args:
        fp32_model: the exported fp32 graph (raised to opset 19 here when older), with the export's recipe in
            its metadata (``make onnx`` writes it; the TensorRT target refuses a graph without it).
        placement: a :class:`calibration.policy.Placement`, or the names of the fp32 graph's MatMul/Gemm nodes
            to quantize.
        method: "entropy", "percentile" or "max".
        reader: calibration batches; may be None when ``cache`` already holds the ranges.
        path: where the graph is written.
        target: "tensorrt" or "cpu".
        fp16_model: ``target="tensorrt"`` only, and needed there: the fp16 graph of the same export.
        cache: ORT calibration cache (JSON of the fp32 graph's tensor ranges), reused when it exists; None:
            not kept.
        percentile: the percentile for ``method="percentile"``.
        meta: further metadata from the caller (policy, calibration data); values that are not strings are
            JSON-encoded.
        qtype: "int8" or "fp8".

    Returns:
        path, target, the :func:`check_qdq` summary, the fp32 island, the LayerNorm precision, the range cache
        and whether it was reused, and the seconds it took.

    Raises:
        QuantizationError: bad settings, an fp16 graph from another export, or a graph without the target's
            Q/DQ pattern.
        export.settings.ExportError: ``target="tensorrt"`` and a graph records no export recipe.
    """
    precision = graph_precision(target, qtype)
    t0 = time.perf_counter()
    nodes = placement.node_names if isinstance(placement, Placement) else list(placement)
    fp32_model = ensure_opset(fp32_model)
    recipe = _same_export(fp32_model, fp16_model) if target == "tensorrt" else None  # refused before calibrating
    reused = cache is not None and Path(cache).is_file()
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="t2t-int8-") as tmp:
        ranges = Path(cache) if cache is not None else Path(tmp) / "ranges.json"
        qdq = quantize_model(fp32_model, nodes, method, reader=None if reused else reader, cache_path=ranges,
                             percentile=percentile)
        if target == "tensorrt":
            fp16_model = ensure_opset(fp16_model)
            graph, fp16_nodes = quantize_fp16_export(fp16_model, fp32_model, nodes, method, ranges, percentile)
            if qtype == "fp8":
                fp8_counts = _to_fp8(graph, fp16_model, fp32_model, nodes, ranges)
    if target == "cpu":
        graph = to_cpu_int8(qdq)
        check = check_qdq(graph, nodes, mixed_fp16=False)
        # fp32 throughout: no island to speak of (the structural search would name the core).
        island = {"pattern": "none", "nodes": [], "fp32_tensors": []}
    else:
        check = check_qdq(graph, fp16_nodes, fp32_island=recipe.fp32_core, layernorm=recipe.layernorm, qtype=qtype)
        island = fp32_island(graph)
        if qtype == "fp8":
            check.update(fp8_counts)
    set_metadata(graph, int8_metadata(fp32_model, graph, nodes, method, target, percentile, meta, qtype))
    check_graph(graph)
    atomic_save_onnx(graph, path)
    return {"path": str(path), "target": target, "qtype": qtype, "precision": precision, "qdq_check": check,
            "fp32_island": island,
            "layernorm_precision": "fp32" if target == "cpu" else recipe.layernorm,
            "ranges_cache": str(cache) if cache is not None else None, "ranges_reused": reused,
            "seconds": round(time.perf_counter() - t0, 2)}


def _same_export(fp32_model: onnx.ModelProto, fp16_model: onnx.ModelProto | None) -> ExportSettings:
    """The recipe of the fp32 graph, checked to be the fp16 graph's too (and the same model and weights)."""
    recipe = export_recipe(fp32_model)
    if fp16_model is None:
        raise QuantizationError("the TensorRT int8 graph is the export's fp16 graph with Q/DQ: pass fp16_model, "
                                "the <model>.fp16.onnx that `make onnx` wrote with the fp32 graph")
    meta16 = {p.key: p.value for p in fp16_model.metadata_props}
    meta32 = {p.key: p.value for p in fp32_model.metadata_props}
    same = all(meta16.get(k) == meta32.get(k) for k in ("model", "checkpoint_sha256", "img_size"))
    if not same or ExportSettings.from_metadata(meta16, source="the fp16 graph") != recipe:
        raise QuantizationError("the fp16 graph is not from the export that wrote the fp32 graph (another model, "
                                "checkpoint, image size or recipe); re-export both with `make onnx`")
    return recipe


def export_recipe(fp32_model: onnx.ModelProto) -> ExportSettings:
    """The precision recipe the fp32 graph was exported with (its metadata), which the TensorRT int8 graph
    follows. Raises :class:`export.settings.ExportError` (naming ``make onnx``) for a graph without one."""
    meta = {p.key: p.value for p in fp32_model.metadata_props}
    return ExportSettings.from_metadata(meta, source="the fp32 graph")


def int8_metadata(fp32_model: onnx.ModelProto, graph: onnx.ModelProto, nodes: Sequence[str], method: str,
                  target: str, percentile: float, meta: Mapping[str, Any] | None = None,
                  qtype: str = "int8") -> dict[str, str]:
    """The Q/DQ graph's metadata (see :func:`build_qdq`). What the graph is (opset, islands, LayerNorm type)
    is read from the graph itself, with the fp16 export's keys and values; ``precision`` names the target's
    graph (int8 / int8-cpu / fp8); ``qdq_dtype`` the quantized type; an fp8 graph records the GPUs that run it
    (``requires_compute_capability``: SM 8.9, Ada, and later)."""
    out = {p.key: p.value for p in fp32_model.metadata_props}
    out["calib_method"] = method
    out.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (meta or {}).items()})
    out.update({"calib_percentile": str(percentile) if method == "percentile" else "",
                "quantized_nodes": str(len(nodes)), "float_dtype": "float32" if target == "cpu" else "float16",
                "precision": graph_precision(target, qtype), "target": target,
                "qdq_dtype": "float8e4m3fn" if qtype == "fp8" else "int8"})
    if qtype == "fp8":
        out["requires_compute_capability"] = FP8_MIN_COMPUTE_CAPABILITY
    derived = describe_graph(graph)
    return {**out, **derived, "precision": out["precision"]}


def matmul_pairs(fp32_model: onnx.ModelProto, fp16_model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """fp32 graph's MatMul/Gemm node name -> the same layer's node in the fp16 graph of the same export.

    The two graphs come from one model and one recipe, so their MatMul/Gemm nodes are the same layers in the
    same order (the fp16 graph only adds Casts); the pairing is checked against the structural families and
    stages (:func:`calibration.policy.classify_nodes`), not trusted.

    Raises:
        QuantizationError: the graphs do not pair up (not one export).
    """
    mm32 = [n for n in fp32_model.graph.node if n.op_type in ("MatMul", "Gemm")]
    mm16 = [n for n in fp16_model.graph.node if n.op_type in ("MatMul", "Gemm")]
    kinds = [{c.name: (c.op_type, c.family, c.stage) for c in classify_nodes(m)} for m in (fp32_model, fp16_model)]
    if len(mm32) != len(mm16) or any(kinds[0].get(a.name) != kinds[1].get(b.name) for a, b in zip(mm32, mm16)):
        raise QuantizationError("the fp16 graph's MatMul/Gemm layers do not pair with the fp32 graph's: they are not "
                                "the two graphs of one export; re-export both with `make onnx`")
    return {a.name: b for a, b in zip(mm32, mm16)}


def quantize_fp16_export(fp16_model: onnx.ModelProto, fp32_model: onnx.ModelProto, nodes: Sequence[str],
                         method: str, ranges: str | os.PathLike,
                         percentile: float = 99.99) -> tuple[onnx.ModelProto, list[str]]:
    """The TensorRT int8 graph: the export's own fp16 graph with Q/DQ on the policy's layers.

    The fp32 island, the LayerNorm precision and every Cast are the export's (the fp16 graph keeps what
    :class:`export.settings.ExportSettings` chose); nothing is converted or rebuilt here. The activation ranges
    are the fp32 graph's calibration (``ranges``, ORT's cache written by :func:`quantize_model`), renamed to
    the fp16 graph's tensors through :func:`matmul_pairs` and typed float16, so onnxruntime writes fp16
    scales (opset >= 19) and every DequantizeLinear feeds its fp16 MatMul; the CPU target's graph uses the
    same ranges. Weights are quantized per channel from the fp16 graph's weights.

    Args:
        fp16_model: ``<model>.fp16.onnx`` of the export that wrote ``fp32_model`` (opset >= 19).
        fp32_model: the fp32 graph the placement and the ranges belong to.
        nodes: the placement's node names in the fp32 graph.
        method: the calibration method ``ranges`` was computed with.
        ranges: ORT calibration cache of the fp32 graph.
        percentile: as for :func:`quantize_model`.

    Returns:
        The sorted Q/DQ graph, and the names of its quantized nodes (the fp16 graph's names for ``nodes``).
    """
    pairs = matmul_pairs(fp32_model, fp16_model)
    unknown = [n for n in nodes if n not in pairs]
    if unknown:
        raise QuantizationError(f"not MatMul/Gemm nodes of the fp32 graph, so nothing to quantize: {unknown[:3]}")
    cache = json.loads(Path(ranges).read_text())
    data = _fp16_ranges(fp16_model, fp32_model, nodes, cache["data"], pairs)
    with tempfile.TemporaryDirectory(prefix="t2t-calib-fp16-") as tmp:
        renamed = Path(tmp) / "ranges-fp16.json"
        renamed.write_text(json.dumps({**cache, "data": data}))
        qdq = quantize_model(fp16_model, [pairs[n].name for n in nodes], method, cache_path=renamed,
                             percentile=percentile)
    _reroute_non_policy_consumers(qdq)
    return toposort(qdq), [pairs[n].name for n in nodes]


def _fp16_ranges(fp16_model: onnx.ModelProto, fp32_model: onnx.ModelProto, nodes: Sequence[str],
                 ranges: Mapping[str, Any], pairs: Mapping[str, onnx.NodeProto]) -> dict[str, dict]:
    """The fp32 graph's activation ranges (ORT's cache entries) renamed to the fp16 graph's tensors and typed as
    they are there: the scale's type follows the range's (float16, or float32 inside the fp32 island, where a
    policy quantizes the Performer's MatMuls)."""
    types = value_types(fp16_model)
    weights = {i.name for i in fp32_model.graph.initializer}
    by_name = {n.name: n for n in fp32_model.graph.node}
    data = {}
    for name in nodes:
        for t32, t16 in zip(by_name[name].input[:2], pairs[name].input[:2]):
            if t32 not in weights and t32 in ranges:
                entry = dict(ranges[t32])
                dtype = "float32" if types.get(t16) == TensorProto.FLOAT else "float16"
                for bound in ("lowest", "highest"):
                    value = entry[bound]
                    values = value["data"] if isinstance(value, dict) else [value]  # an array or a plain float
                    entry[bound] = {"data": values, "dtype": dtype, "CLS": "numpy.array"}
                data[t16] = entry
    return data


def _to_fp8(graph: onnx.ModelProto, fp16_model: onnx.ModelProto, fp32_model: onnx.ModelProto,
            nodes: Sequence[str], ranges: str | os.PathLike) -> dict[str, int]:
    """The TensorRT int8 graph ``graph`` rewritten to fp8 in place (:func:`calibration.fp8.to_fp8`): weights
    requantized from the fp16 export's float weights, activation scales from the fp32 graph's ranges."""
    pairs = matmul_pairs(fp32_model, fp16_model)
    inits = {i.name: i for i in fp16_model.graph.initializer}
    weights = {pairs[n].name: {i: numpy_helper.to_array(inits[t]).astype(np.float32)
                               for i, t in enumerate(pairs[n].input[:2]) if t in inits} for n in nodes}
    data = _fp16_ranges(fp16_model, fp32_model, nodes, json.loads(Path(ranges).read_text())["data"], pairs)
    return to_fp8(graph, weights, data)


def to_cpu_int8(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """The Q/DQ graph for ONNX Runtime's CPU provider: fp32 outside the Q/DQ pairs (which it fuses into
    ``MatMulIntegerToFloat``), only the policy's MatMul/Gemm nodes reading int8-rounded values, sorted.

    No fp16 anywhere: the CPU provider would run the Casts as separate kernels. Modifies ``qdq_model``.
    """
    _reroute_non_policy_consumers(qdq_model)
    return toposort(qdq_model)


def fp32_island(model: onnx.ModelProto) -> dict:
    """The fp32 parts of a mixed graph, as the export report records them: the island's nodes, and every fp32
    tensor with its reason (the Performer island, or an fp32 LayerNorm)."""
    nodes = performer_core_nodes(model)
    tensors = [t for t in fp32_tensors(model) if t["producer"] != "graph input"]
    return {"pattern": "performer_core_fp32" if nodes else "none", "nodes": nodes,
            "fp32_tensors": fp32_tensor_reasons(model, tensors)}


def _reroute_non_policy_consumers(model: onnx.ModelProto) -> int:
    """Feed the float tensor, not its fake-quantized copy, to nodes that are not quantized layers.

    onnxruntime routes every consumer of a quantized activation through its DequantizeLinear (here: the
    Shape nodes that read the batch/token sizes of an attention input). Only MatMul/Gemm nodes should
    see int8-rounded values; the others get the original tensor back (the input of the Q node).
    """
    graph = model.graph
    prod = producers(graph)
    moved = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(node.input):
            dq = prod.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                moved += 1
    return moved


def check_qdq(model: onnx.ModelProto, expected_nodes: Iterable[str], mixed_fp16: bool = True,
              fp32_island: bool = True, layernorm: str = "fp16", qtype: str = "int8") -> dict:
    """Assert the Q/DQ pattern TensorRT accepts; return a summary.

    ``qtype`` is the quantized type every weight and zero point must have: ``int8`` or ``fp8``
    (float8e4m3fn); "int8" below reads as that type.

    * every expected node takes ALL its MatMul/Gemm data inputs from DequantizeLinear;
    * constant inputs (weights): int8 initializer -> DQ with a per-channel scale (1-D, ``axis`` set to the
      output-channel axis);
    * activation inputs: Q -> DQ with scalar (per-tensor) scales;
    * every zero point is int8 and 0;
    * no other node consumes a DQ output, and no LayerNorm/Softmax/Add/Exp/... consumes one;
    * with ``mixed_fp16``: every float initializer (scales included) is fp16, except the ones only the
      fp32 island reads (``w`` and the core's constants);
    * with ``mixed_fp16`` and ``fp32_island``: every float output of a Performer-core node
      (:func:`calibration.policy.performer_core_nodes`, found again from this graph's structure) is fp32,
      and nothing outside it but the graph I/O is fp32 (the Casts into the island belong to it).

    Raises:
        QuantizationError: listing every violation.
    """
    graph = model.graph
    expected = set(expected_nodes)
    by_name = {n.name: n for n in graph.node}
    problems = [f"{name}: expected quantized node is missing from the graph" for name in sorted(expected - set(by_name))]
    island = set(performer_core_nodes(model)) if mixed_fp16 and fp32_island else set()
    inside = _int8_in_island(graph, expected, island)
    want = _ZERO_POINT_TYPE[qtype]
    problems += _qdq_node_problems(graph, expected, mixed_fp16, fp32_scales=inside, want=want)
    counts = _policy_input_problems(graph, [by_name[n] for n in sorted(expected & set(by_name))], problems, want)
    if mixed_fp16:
        # With fp32 LayerNorms, the LayerNormalization nodes (and the Casts around them) are fp32 too.
        ln = _layernorm_fp32_nodes(model) if layernorm == "fp32" else set()
        readers = consumers(graph)
        for i in graph.initializer:
            names = {c.name for c in readers.get(i.name, [])}
            if i.data_type == TensorProto.FLOAT and not (names and names <= island | ln | inside):
                problems.append(f"initializer {i.name} is still fp32 in the mixed fp16 graph outside the fp32 island")
        if fp32_island:
            problems += _island_problems(model, island, ln | inside)
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise QuantizationError(f"the {qtype} graph does not have the Q/DQ pattern TensorRT accepts:\n  {head}{more}")
    return {"quantized_nodes": len(expected), "weight_dq": counts["weight"], "activation_qdq": counts["activation"],
            "q_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dq_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node),
            "fp32_island_nodes": len(island)}


def _int8_in_island(graph: onnx.GraphProto, expected: set[str], island: set[str]) -> set[str]:
    """Policy nodes inside the fp32 island (a policy that quantizes the Performer's MatMuls: every reader of
    their output is an island node, or the Q/DQ of another such layer) with their DequantizeLinear and
    QuantizeLinear nodes: int8 layers that compute in float32, with float32 scales, as the island around them."""
    readers, prod = consumers(graph), producers(graph)
    out: set[str] = set()
    grew = True
    while grew:  # kp^T @ v feeds qp @ (kp^T v) through its Q/DQ: found once qp @ (kp^T v) is
        grew = False
        for n in graph.node:
            if n.name in expected and n.name not in out and readers.get(n.output[0]) and \
                    all(c.name in island | out for c in readers[n.output[0]]):
                out.add(n.name)
                grew = True
                for dq in (prod.get(t) for t in n.input[:2]):
                    if dq is not None and dq.op_type == "DequantizeLinear":
                        out.add(dq.name)
                        q = prod.get(dq.input[0])
                        if q is not None and q.op_type == "QuantizeLinear":
                            out.add(q.name)
    return out


def _qdq_node_problems(graph: onnx.GraphProto, expected: set[str], mixed_fp16: bool,
                       fp32_scales: set[str] = frozenset(), want: int = TensorProto.INT8) -> list[str]:
    """Every Q/DQ node: an int8 zero point 0 (initializer), an fp16 scale in the mixed graph (except the ones in
    ``fp32_scales``, inside the fp32 island); every DQ output read only by policy nodes."""
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    problems: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        problems += _zero_point_problems(node, inits, want)
        scale = inits.get(node.input[1])
        if mixed_fp16 and scale is not None and scale.data_type != TensorProto.FLOAT16 and node.name not in fp32_scales:
            problems.append(f"{node.name}: scale is {TensorProto.DataType.Name(scale.data_type)}, want FLOAT16")
        if node.op_type == "DequantizeLinear":
            for c in {id(c): c for c in readers.get(node.output[0], [])}.values():  # each reader once
                if c.op_type in NEVER_QUANTIZED_OPS:
                    problems.append(f"{c.name} ({c.op_type}) consumes int8 data: the policy forbids it")
                elif c.name not in expected:
                    problems.append(f"{c.name} ({c.op_type}) consumes a DQ output but is not in the policy")
    return problems


def _zero_point_problems(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
                         want: int = TensorProto.INT8) -> list[str]:
    name = TensorProto.DataType.Name(want)
    if len(node.input) < 3 or not node.input[2]:
        return [f"{node.name}: no explicit zero point (TensorRT needs a {name} zero point 0)"]
    zp = inits.get(node.input[2])
    if zp is None:
        return [f"{node.name}: zero point is not an initializer"]
    problems = []
    if zp.data_type != want:
        problems.append(f"{node.name}: zero point type {TensorProto.DataType.Name(zp.data_type)}, want {name}")
    elif np.any(numpy_helper.to_array(zp).astype(np.float32) != 0):
        problems.append(f"{node.name}: non-zero zero point (asymmetric)")
    return problems


def _policy_input_problems(graph: onnx.GraphProto, expected: Sequence[onnx.NodeProto],
                           problems: list[str], want: int = TensorProto.INT8) -> dict[str, int]:
    """Both data inputs of every policy node come from DequantizeLinear: weights per-channel int8 along the
    output axis, activations per-tensor behind a QuantizeLinear. Appends to ``problems``; returns the counts."""
    inits = {i.name: i for i in graph.initializer}
    prod = producers(graph)
    counts = {"weight": 0, "activation": 0}
    for node in expected:
        for idx in range(2):
            t = node.input[idx]
            dq = prod.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                problems.append(f"{node.name}: input {idx} ({t}) does not come from DequantizeLinear")
                continue
            x = dq.input[0]
            scale = inits.get(dq.input[1])
            if scale is None:
                problems.append(f"{dq.name}: scale is not an initializer")
                continue
            scale_arr = numpy_helper.to_array(scale)
            if x in inits:  # weight
                counts["weight"] += 1
                w = inits[x]
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                if w.data_type != want:
                    problems.append(f"{dq.name}: weight stored as {TensorProto.DataType.Name(w.data_type)}, "
                                    f"want {TensorProto.DataType.Name(want)}")
                want_axis = 0 if (node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)) \
                    else len(w.dims) - 1
                if scale_arr.ndim != 1 or scale_arr.size != w.dims[axis] or scale_arr.size < 2 and w.dims[axis] > 1:
                    problems.append(f"{dq.name}: weight scale shape {scale_arr.shape} is not per-channel "
                                    f"over axis {axis} of {list(w.dims)}")
                if axis % len(w.dims) != want_axis:
                    problems.append(f"{dq.name}: per-channel axis {axis}, want the output-channel axis {want_axis}")
            else:  # activation
                counts["activation"] += 1
                q = prod.get(x)
                if q is None or q.op_type != "QuantizeLinear":
                    problems.append(f"{dq.name}: activation DQ is not fed by QuantizeLinear")
                if scale_arr.size != 1:
                    problems.append(f"{dq.name}: activation scale has {scale_arr.size} values, want per-tensor")
    return counts


def _layernorm_fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """LayerNormalization nodes and the Casts to fp32 that feed them."""
    prod = producers(model.graph)
    nodes = set()
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":
            nodes.add(n.name)
            for t in n.input:
                p = prod.get(t)
                if p is not None and p.op_type == "Cast":
                    nodes.add(p.name)
    return nodes


def _island_problems(model: onnx.ModelProto, island: set[str], fp32_ok: set[str] = frozenset()) -> list[str]:
    """Float tensors typed against the island: core outputs not fp32, fp32 tensors outside it (and outside
    ``fp32_ok``, the LayerNorms kept fp32)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    readers = consumers(model.graph)
    problems = []
    for n in model.graph.node:
        for o in n.output:
            t = types.get(o)
            if t not in floats or o in io:
                continue
            if n.name in island and t != TensorProto.FLOAT:
                problems.append(f"{n.name} ({n.op_type}) is in the Performer core but outputs "
                                f"{TensorProto.DataType.Name(t)}: the fp32 island was dropped")
            elif n.name not in island and n.name not in fp32_ok and t == TensorProto.FLOAT:
                problems.append(f"{n.name} ({n.op_type}) outputs FLOAT outside the fp32 island")
            elif n.name not in island and n.op_type == "Cast" and any(c.name in island for c in readers.get(o, [])):
                problems.append(f"{n.name} rounds a tensor of the fp32 island to fp16 between two of its nodes")
    return problems
