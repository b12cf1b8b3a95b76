"""Export-time graph patterns: small, named swaps (on a copy of the PyTorch model) and ONNX rewrites.

The PyTorch model stays the reference; every pattern here changes how the graph is *written*, never
what it computes. Each pattern is a function named after what it makes, applied by
:func:`export.to_onnx.export_onnx` and asserted by ``tests/test_export.py``:

* :func:`soft_split_as_conv` - each soft split (``nn.Unfold``) becomes one ``Conv`` with a one-hot
  kernel, instead of the Gather/GatherND/ScatterND (or Col2Im/Im2Col) chains exporters emit for
  Unfold; TensorRT has no Im2Col and runs gathers poorly. The default form is grouped (``group=C``,
  C*k^4 multiply-adds per output pixel); the dense form (:class:`DenseSoftSplit`, C^2*k^4, mostly by
  zero) stays selectable for comparison (``--soft-split conv``). Why grouped for TensorRT too:
  docs/export.md.
* :func:`explicit_attention` - softmax attention exported as MatMul -> Softmax(last axis) -> MatMul on
  4-D [B, heads, tokens, dim] tensors with the scale applied to Q first (TensorRT's fused-attention
  pattern), instead of whatever ``scaled_dot_product_attention`` lowers to (an opset-23 ``Attention``
  op, or a scale applied after Q.K^T).
* :func:`remove_reduction_upcasts` - the dynamo exporter wraps every ReduceSum/ReduceMax of an fp16
  model in Cast(fp32) -> Reduce -> Cast(fp16) (PyTorch's reduction type promotion). Those are fp32
  islands TensorRT's strong typing would honour; the T2T Performer keeps every summed quantity <= 1
  or <= m (see ``t2t_vit/layers.py``), so the fp16 graph drops them (measured in the export report).
* :func:`performer_core_fp32` - fp16 graphs only: the Performer's linear-attention core (between
  the ``kqv`` and ``proj`` Linears) runs in float32 behind explicit Casts, the one fp32 island, measured
  to be needed (see its docstring); everything else is fp16.
* :func:`layernorm_fp32` - fp16 graphs, when chosen (``--layernorm-precision fp32``): every LayerNorm computes
  in float32 behind explicit Casts. Under strong typing TensorRT computes LayerNormalization in its input
  type, so an fp16 LayerNorm squares and sums in fp16 (see docs/export.md and the measured headroom in
  reports/precision-layernorm-*).
* :func:`simplify` - constant folding and graph simplification with onnxslim.

The Performer (``t2t_vit.layers.TokenPerformer``) already exports as plain MatMul/ReduceSum/Exp
arithmetic (no Einsum) and LayerNorm exports as single ``LayerNormalization`` nodes at opset >= 17;
:func:`op_census` and :func:`check_patterns` verify both on every exported graph.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2t_vit.errors import T2TError
from t2t_vit.graphs import ONNX_FLOAT, ONNX_FLOAT16, consumers, producers, value_types
from t2t_vit.layers import Attention, SoftSplit, TokenAttention

__all__ = [
    "FORBIDDEN_OPS",
    "apply_export_patterns",
    "soft_split_as_conv",
    "SOFT_SPLIT_FORMS",
    "DEFAULT_SOFT_SPLIT",
    "DenseSoftSplit",
    "explicit_attention",
    "remove_reduction_upcasts",
    "performer_core_fp32",
    "layernorm_fp32",
    "Fp32LayerNorm",
    "LAYERNORM_PRECISIONS",
    "simplify",
    "op_census",
    "count_layernorms",
    "count_softmax_attention",
    "check_patterns",
    "attention_chains",
    "PatternError",
]

# Ops that must never appear in an exported graph: Einsum (slow and fp32-typed in TensorRT), and the
# gather/scatter/im2col families exporters use to decompose Unfold.
FORBIDDEN_OPS = ("Einsum", "GatherND", "ScatterND", "ScatterElements", "GatherElements", "Col2Im", "Im2Col")

class PatternError(T2TError, RuntimeError):
    """An exported graph does not have the TensorRT-friendly form; the message names the pattern."""


SOFT_SPLIT_FORMS = ("grouped", "conv")
DEFAULT_SOFT_SPLIT = "grouped"


class DenseSoftSplit(SoftSplit):
    """A soft split computed by a dense one-hot convolution, (C*k*k, C, k, k): kept for comparison only.

    C^2*k^4 multiply-adds per output pixel, C times the grouped form's (3x for the first split, 64x for
    the others), all but C*k^4 of them multiplying by zero; the same numbers exactly (each output is one
    input value, copied). ``--soft-split conv`` exports it; docs/export.md has the cost of both forms.
    The kernel is a non-persistent buffer, so the state dict is the split's own.
    """

    def __init__(self, split: SoftSplit):
        super().__init__(split.in_chans, split.kernel_size, split.stride, split.padding, impl="grouped")
        k = self.kernel_size
        eye = torch.eye(self.out_chans, dtype=torch.float32).reshape(self.out_chans, self.in_chans, k, k)
        ref = split.one_hot_grouped  # the split's dtype and device (a half model's splits are half)
        self.register_buffer("one_hot", eye.to(ref), persistent=False)
        self.one_hot_grouped = self.one_hot_grouped.to(ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.one_hot.to(x.dtype), stride=self.stride, padding=self.padding)
        return y.flatten(2).transpose(1, 2)


def _swap_soft_splits(model: nn.Module, dense: bool) -> None:
    """Replace every soft split by its dense form (``dense``) or the dense ones back by plain splits."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if dense and type(child) is SoftSplit:
                setattr(parent, name, DenseSoftSplit(child))
            elif not dense and type(child) is DenseSoftSplit:
                plain = SoftSplit(child.in_chans, child.kernel_size, child.stride, child.padding, impl="grouped")
                setattr(parent, name, plain.to(child.one_hot_grouped))


def soft_split_as_conv(model: nn.Module, form: str = DEFAULT_SOFT_SPLIT) -> nn.Module:
    """Switch every soft split to a one-hot ``Conv`` (identical numbers, no gather chains), in place:
    ``"grouped"`` (one group per input channel, the default) or ``"conv"`` (dense, :class:`DenseSoftSplit`)."""
    if form not in SOFT_SPLIT_FORMS:
        raise PatternError(f"--soft-split must be one of {SOFT_SPLIT_FORMS}, got {form!r}")
    _swap_soft_splits(model, dense=form == "conv")
    model.set_soft_split_impl("grouped")
    return model


def explicit_attention(model: nn.Module) -> nn.Module:
    """Switch every softmax attention to the explicit MatMul -> Softmax -> MatMul path (scale on Q)."""
    model.set_fused_attn(False)
    return model


FP32_ISLAND_REASON = ("Performer linear-attention core (feature exponents w.x - |x|^2/2, exp, sums, D, "
                      "rescaled epsilon, y/D) kept fp32: in fp16 the exponent loses its O(1) differences, D "
                      "underflows and the rescaled epsilon overflows (the export report's contrast row measures "
                      "the graph without it). See t2t_vit.layers.TokenPerformer")
LAYERNORM_FP32_REASON = ("LayerNorm computed in fp32 behind Casts (--layernorm-precision fp32, the default): in fp16 "
                         "its sum of squares overflows past 65504, and a trained checkpoint's last LayerNorms come "
                         "close (docs/precision.md; make precision measures the margin)")


def fp32_tensor_reasons(model_proto, tensors: list[dict[str, str]]) -> list[dict[str, str]]:
    """``tensors`` (from ``t2t_vit.graphs.fp32_tensors``) each with the reason it is fp32 in a mixed graph:
    a LayerNormalization's input, weights or output (the LayerNorm choice), else the Performer island."""
    ln = {t for n in model_proto.graph.node if n.op_type == "LayerNormalization" for t in (*n.input, *n.output)}
    return [{**t, "reason": LAYERNORM_FP32_REASON if t["tensor"] in ln else FP32_ISLAND_REASON} for t in tensors]


def performer_core_fp32(model: nn.Module, enable: bool = True) -> nn.Module:
    """Keep each TokenPerformer's linear-attention core in float32 (explicit Casts around it) while the
    rest of a half-precision model stays fp16 (``enable=False``: a pure fp16 graph, for comparison).

    The island is the model package's own (``TokenPerformer.fp32_core``, on by default, measured to be
    needed: see its docstring); this pattern only selects it for export. Changes nothing for a float32
    model and nothing at all for token transformers (t2t_vit_t_*)."""
    model.set_performer_fp32_core(enable)
    return model


LAYERNORM_PRECISIONS = ("fp16", "fp32")


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm that computes in float32 whatever its input type, and returns the input type.

    In a half model it exports as Cast(fp16 -> fp32) -> LayerNormalization (fp32 weights) -> Cast(fp32 -> fp16).
    """

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def layernorm_fp32(model: nn.Module, enable: bool = True) -> nn.Module:
    """Swap every ``nn.LayerNorm`` for :class:`Fp32LayerNorm` (in place; same parameters, same numbers in fp32)."""
    if not enable:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                swapped = Fp32LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=True)
                swapped.load_state_dict(child.state_dict())
                swapped.to(child.weight.dtype)
                setattr(parent, name, swapped)
    return model


# name -> swap, applied in order. Each one is a setter of the model package, so the reference
# numerics are the package's own (tested there); here they are only selected for export. The one form
# defined here, the dense soft split, is tested against Unfold in tests/test_model.py.
MODULE_PATTERNS = {
    "soft_split_as_conv": soft_split_as_conv,
    "explicit_attention": explicit_attention,
}


def apply_export_patterns(model: nn.Module, patterns: bool = True, soft_split: str = DEFAULT_SOFT_SPLIT) -> nn.Module:
    """A deep copy of ``model`` in eval mode with the export-time swaps applied (``patterns=False``:
    the copy keeps the training-time forms, Unfold and SDPA, for the "plain export" baseline).

    The caller's model is never modified, so it stays the numerical reference.
    """
    out = copy.deepcopy(model).eval()
    if patterns:
        out = soft_split_as_conv(out, soft_split)
        out = explicit_attention(out)
    else:
        _swap_soft_splits(out, dense=False)
        out.set_soft_split_impl("unfold")
        out.set_fused_attn(True)
    return out


def _cast_to(node) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def remove_reduction_upcasts(model_proto, ops: tuple[str, ...] = ("ReduceSum", "ReduceMax")) -> tuple[Any, list[str]]:
    """Remove ``Cast(fp16->fp32) -> Reduce -> Cast(fp32->fp16)`` islands, in place.

    Only islands whose first Cast reads an fp16 tensor (checked with ONNX shape inference), whose
    reduction has that Cast as its only producer, and whose result feeds only the Cast back to fp16
    are rewritten; anything else is left as is. Returns the model and the names of the reductions
    that now run in fp16.
    """
    graph = model_proto.graph
    producer = producers(graph)
    if not any(n.op_type in ops and n.input and getattr(producer.get(n.input[0]), "op_type", "") == "Cast"
               for n in graph.node):
        return model_proto, []  # nothing to rewrite: skip shape inference (a copy of every weight)
    elem_type = value_types(model_proto)
    readers = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    rewired: list[str] = []
    dead: list = []
    for node in list(graph.node):
        if node.op_type not in ops:
            continue
        up = producer.get(node.input[0])
        if up is None or up.op_type != "Cast" or _cast_to(up) != ONNX_FLOAT:
            continue
        if elem_type.get(up.input[0]) != ONNX_FLOAT16 or len(readers.get(up.output[0], [])) != 1:
            continue
        downs = readers.get(node.output[0], [])
        if len(downs) != 1 or downs[0].op_type != "Cast" or _cast_to(downs[0]) != ONNX_FLOAT16:
            continue
        if node.output[0] in graph_outputs:
            continue
        down = downs[0]
        node.input[0] = up.input[0]
        # The reduction now writes the tensor the second Cast wrote, so every consumer is unchanged.
        node.output[0] = down.output[0]
        dead.extend([up, down])
        rewired.append(node.name or node.output[0])
    for n in dead:
        graph.node.remove(n)
    if dead:
        # Stale fp32 value_info entries of rewired tensors would contradict the new fp16 types.
        keep = [vi for vi in graph.value_info if vi.name not in {o for n in dead for o in n.output}]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return model_proto, rewired


def simplify(model_proto) -> Any:
    """Constant folding and graph simplification (onnxslim); dynamic batch and I/O names are kept."""
    import onnxslim

    return onnxslim.slim(model_proto)


def op_census(model_proto) -> dict[str, int]:
    """Node count per op type (main graph), sorted by count then name."""
    counts = Counter(n.op_type for n in model_proto.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def count_layernorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.LayerNorm) for m in model.modules())


def count_softmax_attention(model: nn.Module) -> int:
    """Number of softmax attention blocks (backbone Attention + token-transformer attention)."""
    return sum(isinstance(m, (Attention, TokenAttention)) for m in model.modules())


def check_patterns(model_proto, model: nn.Module) -> dict[str, Any]:
    """Assert the TensorRT-friendly patterns on an exported graph; returns what was checked.

    Raises :class:`PatternError` naming the first pattern that does not hold.
    """
    census = op_census(model_proto)
    bad = {op: census[op] for op in FORBIDDEN_OPS if census.get(op)}
    if bad:
        raise PatternError(f"graph holds forbidden ops {bad}: Einsum or an Unfold decomposition was exported; "
                           f"export through export_onnx (patterns soft_split_as_conv / explicit_attention)")
    n_ln = count_layernorms(model)
    if census.get("LayerNormalization", 0) != n_ln:
        raise PatternError(f"LayerNormalization nodes: {census.get('LayerNormalization', 0)}, model has {n_ln} "
                           f"nn.LayerNorm; a LayerNorm was decomposed (use opset >= 17)")
    n_attn = count_softmax_attention(model)
    if census.get("Softmax", 0) != n_attn:
        raise PatternError(f"Softmax nodes: {census.get('Softmax', 0)}, model has {n_attn} softmax attentions; "
                           f"attention was not exported in the explicit MatMul-Softmax-MatMul form")
    if census.get("Attention", 0):
        raise PatternError("graph holds fused Attention ops; the explicit_attention pattern was not applied")
    n_split = 3
    if census.get("Conv", 0) != n_split:
        raise PatternError(f"Conv nodes: {census.get('Conv', 0)}, expected {n_split} (one per soft split)")
    splits = [m for m in model.modules() if type(m).__name__ == "SoftSplit"]
    convs = [n for n in model_proto.graph.node if n.op_type == "Conv"]
    for conv, split in zip(convs, splits):
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        want = split.in_chans if split.impl == "grouped" else 1
        if group != want:
            raise PatternError(f"{conv.name}: group={group}, the {split.impl} soft split over {split.in_chans} "
                               f"channels exports group={want}")
    softmax_ok = _softmax_last_axis(model_proto)
    if not softmax_ok:
        raise PatternError("a Softmax is not on the last axis")
    return {"forbidden_ops": 0, "layernorm_nodes": n_ln, "softmax_nodes": n_attn, "soft_split_convs": n_split}


def _softmax_last_axis(model_proto) -> bool:
    for n in model_proto.graph.node:
        if n.op_type == "Softmax":
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            if axis != -1:
                # A positive axis is the last one only for 4-D inputs (axis 3).
                if axis != 3:
                    return False
    return True


def attention_chains(model_proto) -> list[dict[str, Any]]:
    """For every Softmax: the MatMul feeding it, whether its Q input is scaled by a Mul before the
    MatMul, and the MatMul consuming the Softmax. Used by the tests to assert TensorRT's MHA form."""
    producer = producers(model_proto.graph)
    readers = consumers(model_proto.graph)
    chains = []
    for n in model_proto.graph.node:
        if n.op_type != "Softmax":
            continue
        mm1 = producer.get(n.input[0])
        q_src = producer.get(mm1.input[0]) if mm1 is not None and mm1.op_type == "MatMul" else None
        nxt = readers.get(n.output[0], [])
        chains.append({
            "softmax": n.name,
            "qk_matmul": mm1 is not None and mm1.op_type == "MatMul",
            "q_scaled_first": q_src is not None and q_src.op_type == "Mul",
            "av_matmul": len(nxt) == 1 and nxt[0].op_type == "MatMul",
            "qk_output": mm1.output[0] if mm1 is not None else None,
        })
    return chains
