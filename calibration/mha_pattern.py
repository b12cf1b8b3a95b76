"""Does each softmax attention of an ONNX graph have the Q/DQ placement TensorRT's FP8 MHA fusion needs?

A pure structural check (no ONNX Runtime, no TensorRT): for every ``Softmax`` it finds the attention around
it, ``BMM1 = MatMul(Q, K^T) -> [Mul/Div scale] -> [Add mask] -> Softmax -> BMM2 = MatMul(P, V)``, and
reports where the quantizers sit. The fusable FP8 pattern (docs/fp8.md has the sources) is:

- Q, K and V each reach their MatMul from a ``DequantizeLinear`` of a ``QuantizeLinear`` pair with a
  ``float8e4m3fn`` zero point; only data-movement ops (Transpose, Reshape, Squeeze, Unsqueeze) may sit
  between the DequantizeLinear and the MatMul (TensorRT moves DQ across them);
- the Softmax output is quantized the same way before BMM2 (a Cast may sit between Softmax and the Q);
- the attention scale is applied to Q or K before BMM1, not to the BMM1 output (TensorRT's fused-attention
  page requires it there "for numeric stability and performance reasons").

``mha_patterns(model)`` returns one :class:`AttentionPattern` per softmax; ``summarize_patterns`` counts
them for a report. The same functions check int8 graphs: there the Q/DQ are int8, so ``fp8_fusable`` is
False with that reason, while ``qdq_placed`` says whether the placement itself is the one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import onnx

from t2t_vit.graphs import consumers, producers

__all__ = ["AttentionPattern", "mha_patterns", "summarize_patterns", "qdq_dtype", "const_values", "MOVEMENT_OPS",
           "FP8"]

FP8 = "float8e4m3fn"
# Ops TensorRT's Q/DQ propagation moves a DequantizeLinear across (they only move data).
MOVEMENT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze")
_SCALE_OPS = ("Mul", "Div")
# What may sit between BMM1 and Softmax besides a scale: the mask Add, and type or shape plumbing.
_PRE_SOFTMAX_OK = ("Add", "Cast", "Where") + MOVEMENT_OPS


@dataclass(frozen=True)
class AttentionPattern:
    """The Q/DQ placement around one softmax attention.

    Attributes:
        softmax: the Softmax node's name.
        bmm1: the MatMul producing the scores (None when none was found above the Softmax).
        bmm2: the MatMul reading the probabilities (None when none was found below it).
        q, k, v, softmax_out: the Q/DQ element type feeding that operand (``float8e4m3fn``, ``int8``...),
            or None when the operand is not quantized.
        scale: where the attention scale is applied: ``q``, ``k`` (before BMM1, as TensorRT needs),
            ``scores`` (on the BMM1 output) or None (no constant Mul/Div found: folded into weights).
        head_size: the last dimension of V where shape inference knows it, else None.
        dq_direct: every quantized operand's DequantizeLinear feeds its MatMul directly (no Transpose/Reshape
            between them), the form Model Optimizer's FP8 exporter rewrites attentions into.
        problems: why the pattern is not the fusable FP8 one (empty when it is).
    """

    softmax: str
    bmm1: str | None
    bmm2: str | None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    softmax_out: str | None = None
    scale: str | None = None
    head_size: int | None = None
    dq_direct: bool = False
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def qdq_placed(self) -> bool:
        """Q/DQ (of any type) on Q, K, V and the softmax output, and the scale not on the scores."""
        return (self.bmm1 is not None and self.bmm2 is not None and self.scale != "scores"
                and None not in (self.q, self.k, self.v, self.softmax_out))

    @property
    def fp8_fusable(self) -> bool:
        """The placement TensorRT's FP8 MHA fusion needs, with float8e4m3fn Q/DQ throughout."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = list(self.problems)
        d["qdq_placed"], d["fp8_fusable"] = self.qdq_placed, self.fp8_fusable
        return d


def const_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """tensor name -> TensorProto for initializers and Constant-node outputs."""
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    out[n.output[0]] = a.t
    return out


def qdq_dtype(q_node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> str:
    """The element type a QuantizeLinear produces: its zero point's type, else ``output_dtype``, else uint8
    (the ONNX default)."""
    if len(q_node.input) > 2 and q_node.input[2]:
        zp = consts.get(q_node.input[2])
        if zp is not None:
            return onnx.TensorProto.DataType.Name(zp.data_type).lower()
    for a in q_node.attribute:
        if a.name == "output_dtype" and a.i:
            return onnx.TensorProto.DataType.Name(a.i).lower()
    return "uint8"


def _quantized_by(tensor: str, prod: Mapping[str, onnx.NodeProto], consts: Mapping[str, onnx.TensorProto],
                  through: Iterable[str]) -> tuple[str | None, onnx.NodeProto | None]:
    """(element type, the QuantizeLinear) when ``tensor`` is DQ(Q(x)) seen through ``through`` ops, else
    (None, None)."""
    through = tuple(through)
    node = prod.get(tensor)
    while node is not None and node.op_type in through:
        node = prod.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None, None
    q = prod.get(node.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None, None
    return qdq_dtype(q, consts), q


def _scale_input(node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> bool:
    """A Mul/Div by a constant (one input is an initializer or Constant)."""
    return node.op_type in _SCALE_OPS and any(i in consts for i in node.input)


def _scale_above(tensor: str, prod: Mapping[str, onnx.NodeProto], consts: Mapping[str, onnx.TensorProto],
                 hops: int = 6) -> bool:
    """A constant Mul/Div on the path above ``tensor`` (through Q/DQ and data movement), within ``hops``."""
    node = prod.get(tensor)
    for _ in range(hops):
        if node is None:
            return False
        if _scale_input(node, consts):
            return True
        if node.op_type not in MOVEMENT_OPS + ("QuantizeLinear", "DequantizeLinear", "Cast"):
            return False
        node = prod.get(node.input[0])
    return False


def _bmm1_of(softmax: onnx.NodeProto, prod, consts) -> tuple[onnx.NodeProto | None, bool]:
    """(BMM1, whether a constant scale sits between it and the Softmax)."""
    node, scaled = prod.get(softmax.input[0]), False
    for _ in range(8):
        if node is None:
            return None, scaled
        if node.op_type == "MatMul":
            return node, scaled
        if _scale_input(node, consts):
            scaled = True
        elif node.op_type not in _PRE_SOFTMAX_OK:
            return None, scaled
        # follow the non-constant input (the scores), not the mask or the scale
        nxt = [i for i in node.input if i and i not in consts and i in prod]
        node = prod.get(nxt[0]) if nxt else None
    return None, scaled


def _bmm2_of(softmax: onnx.NodeProto, cons) -> tuple[onnx.NodeProto | None, str]:
    """(BMM2, the tensor of the softmax path it reads), following Cast and Q/DQ."""
    tensor = softmax.output[0]
    for _ in range(4):
        nxt = cons.get(tensor, [])
        if len(nxt) != 1:
            return None, tensor
        node = nxt[0]
        if node.op_type == "MatMul":
            return (node, tensor) if node.input[0] == tensor else (None, tensor)
        if node.op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear"):
            return None, tensor
        tensor = node.output[0]
    return None, tensor


def _head_size(model: onnx.ModelProto, tensor: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            return int(dims[-1].dim_value) if dims and dims[-1].dim_value else None
    return None


def _check_one(model: onnx.ModelProto, softmax: onnx.NodeProto, prod, cons, consts) -> AttentionPattern:
    bmm1, scores_scaled = _bmm1_of(softmax, prod, consts)
    bmm2, p_tensor = _bmm2_of(softmax, cons)
    problems: list[str] = []
    if bmm1 is None or bmm2 is None:
        missing = "BMM1 (MatMul above the Softmax)" if bmm1 is None else "BMM2 (MatMul reading the Softmax output)"
        return AttentionPattern(softmax.name, bmm1 and bmm1.name, bmm2 and bmm2.name,
                                problems=(f"not an attention: no {missing}",))
    q, _ = _quantized_by(bmm1.input[0], prod, consts, MOVEMENT_OPS)
    k, _ = _quantized_by(bmm1.input[1], prod, consts, MOVEMENT_OPS)
    v, _ = _quantized_by(bmm2.input[1], prod, consts, MOVEMENT_OPS)
    p, _ = _quantized_by(p_tensor, prod, consts, ())
    if scores_scaled:
        scale = "scores"
    elif _scale_above(bmm1.input[0], prod, consts):
        scale = "q"
    elif _scale_above(bmm1.input[1], prod, consts):
        scale = "k"
    else:
        scale = None
    for name, dtype in (("Q", q), ("K", k), ("V", v), ("softmax output", p)):
        if dtype is None:
            problems.append(f"{name} is not quantized")
        elif dtype != FP8:
            problems.append(f"{name} Q/DQ is {dtype}, not {FP8}")
    if scale == "scores":
        problems.append("the attention scale multiplies the BMM1 output; TensorRT needs it on Q (or K) before BMM1")
    direct = all(_quantized_by(t, prod, consts, ())[0] is not None
                 for t in (bmm1.input[0], bmm1.input[1], bmm2.input[1], p_tensor))
    return AttentionPattern(softmax.name, bmm1.name, bmm2.name, q, k, v, p, scale,
                            _head_size(model, bmm2.input[1]), direct, tuple(problems))


def mha_patterns(model: onnx.ModelProto, infer_shapes: bool = True) -> list[AttentionPattern]:
    """One :class:`AttentionPattern` per Softmax of ``model``'s main graph, in graph order.

    Args:
        model: the ONNX model (not modified).
        infer_shapes: run ONNX shape inference on a copy to report the head size.
    """
    if infer_shapes:
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - the head size is informative only; the structure check goes on
            pass
    g = model.graph
    prod, cons, consts = producers(g), consumers(g), const_values(model)
    return [_check_one(model, n, prod, cons, consts) for n in g.node if n.op_type == "Softmax"]


def summarize_patterns(patterns: Iterable[AttentionPattern]) -> dict[str, Any]:
    """Counts for a report: attentions, how many have the Q/DQ placement, how many are FP8-fusable, and the
    distinct problems with how often each occurs."""
    patterns = list(patterns)
    attn = [p for p in patterns if p.bmm1 and p.bmm2]
    problems: dict[str, int] = {}
    for p in attn:
        for msg in p.problems:
            problems[msg] = problems.get(msg, 0) + 1
    return {"softmax": len(patterns), "attentions": len(attn),
            "qdq_placed": sum(p.qdq_placed for p in attn), "fp8_fusable": sum(p.fp8_fusable for p in attn),
            "dq_direct": sum(p.dq_direct for p in attn),
            "scale": sorted({str(p.scale) for p in attn}),
            "head_sizes": sorted({p.head_size for p in attn if p.head_size}), "problems": problems}
