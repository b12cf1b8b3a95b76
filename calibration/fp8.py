"""The FP8 (E4M3) recipe: the TensorRT int8 graph's Q/DQ placement with float8e4m3fn quantizers.

TensorRT's FP8 is E4M3 only: quantize is ``castToFp8(clip(x / scale, -448, 448))`` with round-to-nearest-even,
and the Q/DQ output type is the zero point's type (``float8e4m3fn``, all zero): TensorRT documentation,
"Working with Quantized Types" (quantization schemes), and ONNX's QuantizeLinear-19 (``saturate=1`` clips to
the type's range). So the FP8 graph is the int8 graph (:func:`calibration.quantize.build_qdq`, the same
placement, ranges and fp16 export) with every quantizer rewritten (:func:`to_fp8`):

* activations, per tensor: ``scale = amax / 448`` with ``amax = max(|lowest|, |highest|)`` of the calibrated
  range (the same ranges the int8 graph's ``amax / 127`` came from);
* weights, per output channel: ``scale_c = amax_c / 448`` from the float weights of the fp16 export, and the
  weights stored as float8e4m3fn (``w / scale_c`` clipped to +-448, rounded to nearest even);
* every zero point float8e4m3fn and zero, of the scale's shape; scales keep the int8 graph's types (fp16 in the
  fp16 graph, fp32 inside the Performer's fp32 island), at the same opset (docs/fp8.md says why).

No FP8 GEMM accumulation is modelled: ONNX Runtime dequantizes to fp16/fp32 and multiplies in that type.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from t2t_vit.graphs import consumers, producers

__all__ = ["FP8_MAX", "FP8_TYPE", "fp8_round", "amax_scale", "to_fp8"]

FP8_MAX = 448.0  # largest finite float8e4m3fn
FP8_TYPE = TensorProto.FLOAT8E4M3FN


def fp8_round(x: np.ndarray) -> np.ndarray:
    """``x`` saturated to +-448 and rounded to float8e4m3fn (nearest even), as an ``ml_dtypes`` array."""
    import ml_dtypes

    return np.clip(np.asarray(x, dtype=np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def amax_scale(amax: np.ndarray | float, dtype: np.dtype) -> np.ndarray:
    """``amax / 448`` in the scale's type; an all-zero range gets scale 1 (it quantizes zeros either way)."""
    a = np.asarray(amax, dtype=np.float64)
    s = np.where(a > 0, a / FP8_MAX, 1.0).astype(dtype)
    return np.where(s > 0, s, np.finfo(dtype).tiny).astype(dtype)  # an amax below the type's range: never 0


def _amax(entry: Mapping) -> float:
    """max(|lowest|, |highest|) of an ONNX Runtime calibration-cache entry (plain floats or arrays)."""
    vals = []
    for bound in ("lowest", "highest"):
        v = entry[bound]
        vals += list(np.ravel(v["data"] if isinstance(v, dict) else v))
    return float(np.max(np.abs(np.asarray(vals, dtype=np.float64))))


def to_fp8(qdq: onnx.ModelProto, weights: Mapping[str, np.ndarray], ranges: Mapping[str, Mapping]) -> dict[str, int]:
    """Rewrite the int8 Q/DQ graph ``qdq`` (in place) into the FP8 graph.

    Args:
        qdq: the TensorRT int8 graph (``quantize_fp16_export``'s): int8 weight initializers behind per-channel
            DequantizeLinear, activation QuantizeLinear -> DequantizeLinear pairs, int8 zero points.
        weights: quantized layer name -> ``{input index: float weight}`` from the graph the Q/DQ was placed on
            (the fp16 export), for the weights to be requantized from (not from their int8 rounding).
        ranges: activation tensor name (in ``qdq``) -> its calibration-cache entry (``lowest``/``highest``).

    Returns:
        Counts: weights and activation quantizers rewritten.

    Raises:
        KeyError / ValueError: a quantizer without its weight or range (not a graph of this recipe).
    """
    graph = qdq.graph
    inits = {i.name: i for i in graph.initializer}
    readers, prod = consumers(graph), producers(graph)
    replaced: dict[str, onnx.TensorProto] = {}
    counts = {"weights": 0, "activations": 0}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # a weight
            layer = readers[node.output[0]][0]
            idx = list(layer.input).index(node.output[0])
            w = np.asarray(weights[layer.name][idx], dtype=np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            old_scale = inits[node.input[1]]
            sdtype = numpy_helper.to_array(old_scale).dtype
            amax = np.max(np.abs(w), axis=tuple(d for d in range(w.ndim) if d != axis))
            scale = amax_scale(amax, sdtype)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = fp8_round(w / scale.astype(np.float32).reshape(shape))
            replaced[node.input[0]] = numpy_helper.from_array(q, node.input[0])
            replaced[node.input[1]] = numpy_helper.from_array(scale, node.input[1])
            replaced[node.input[2]] = numpy_helper.from_array(fp8_round(np.zeros(scale.shape)), node.input[2])
            counts["weights"] += 1
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):  # an activation's quantizer pair
            q = node if node.op_type == "QuantizeLinear" else prod.get(node.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                raise ValueError(f"{node.name}: an activation DequantizeLinear without its QuantizeLinear")
            if q.input[0] not in ranges:
                raise KeyError(f"{q.name}: no calibrated range for {q.input[0]}")
            sdtype = numpy_helper.to_array(inits[node.input[1]]).dtype
            scale = amax_scale(_amax(ranges[q.input[0]]), sdtype).reshape(())
            replaced[node.input[1]] = numpy_helper.from_array(scale, node.input[1])
            replaced[node.input[2]] = numpy_helper.from_array(fp8_round(np.zeros(())), node.input[2])
            counts["activations"] += node.op_type == "QuantizeLinear"
    for i, init in enumerate(graph.initializer):
        if init.name in replaced:
            graph.initializer[i].CopyFrom(replaced[init.name])
    _retype_values(graph)
    return counts


def _retype_values(graph: onnx.GraphProto) -> None:
    """Drop the int8 value_info of Q outputs and weights (shape inference retypes them as float8)."""
    qout = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    keep = [v for v in graph.value_info if v.name not in qout and v.type.tensor_type.elem_type != TensorProto.INT8]
    del graph.value_info[:]
    graph.value_info.extend(keep)
