"""The ViT-aware INT8 placement policy: which ONNX nodes get Q/DQ inputs, in ONE place.

Why a policy at all: on vision transformers, quantizing residual Adds, Softmax, LayerNorm or GELU
collapses accuracy (a reported ViT-B fell under 5% top-1 with a default "quantize everything" recipe),
while quantizing only the inputs of the Linear/MatMul layers kept it within a point of fp32
(NVIDIA's TensorRT Model Optimizer documentation on ViT INT8 placement). TensorRT runs exactly the layers whose inputs carry Q/DQ in int8 and
everything else in the precision of the graph's tensors (fp16 here).

Every MatMul/Gemm of an exported T2T-ViT is put in one *family*:

``linear``            a Linear layer (constant weight): kqv/qkv, proj, mlp/fc1/fc2, T2T ``project``.
``head``              the classifier ``head`` (Gemm).
``attn_matmul``       the two activation x activation MatMuls of softmax attention (q @ k^T, attn @ v),
                      in the backbone blocks and in the token-transformer T2T stage (t2t_vit_t_*).
``performer_matmul``  the Performer's kp^T @ v and qp @ (kp^T v) (features in [0, 1]).
``performer_features``the Performer's random-feature projection x @ w^T, whose output goes straight
                      into exp(): int8 error there is amplified exponentially.

and one *stage*: ``t2t.attention1``, ``t2t.attention2``, ``t2t.project``, ``blocks.<i>`` or ``head``.
Every other op (LayerNormalization, Softmax, Gelu/Erf, residual Add, the Performer's Exp, ReduceSum,
ReduceMax and normaliser Div, the soft-split Conv, Reshape/Transpose) is never quantized.
The Performer's linear-attention core (:func:`performer_core_nodes`) is, besides, the one part of the
int8 graph that stays float32 instead of fp16, as in the fp16 export (``TokenPerformer.fp32_core``).

Named policies (``POLICIES``) say which families are quantized; ``exclude_t2t`` drops every node of the
T2T stage (3136 and 784 tokens at 224 px) from any policy.

Families and stages are recognised from the graph's structure (:func:`classify_nodes`), not from node
names, because onnxslim (run by the exporter) renames nodes and drops their module scopes. When an
exporter left scopes (TorchScript ``/blocks.0/attn/qkv/MatMul`` names, or the dynamo exporter's
``pkg.torch.onnx.name_scopes``), they are shown in the listing for reading convenience only.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import onnx

from t2t_vit.errors import T2TError
from t2t_vit.graphs import consumers as _consumers
from t2t_vit.graphs import producers as _producers

__all__ = [
    "FAMILIES",
    "POLICIES",
    "DEFAULT_POLICY",
    "NEVER_QUANTIZED_OPS",
    "Policy",
    "QuantCandidate",
    "PolicyError",
    "node_scope",
    "classify_nodes",
    "select_nodes",
    "group_nodes",
    "get_policy",
    "summarize",
    "Placement",
    "performer_core_nodes",
]

FAMILIES = ("linear", "head", "attn_matmul", "performer_matmul", "performer_features")

# Op types that must never be an int8 layer (their inputs and outputs carry no Q/DQ of their own).
NEVER_QUANTIZED_OPS = frozenset({
    "LayerNormalization", "Softmax", "Gelu", "Erf", "Add", "Exp", "ReduceSum", "ReduceMax", "Div",
    "Sub", "Mul", "Conv", "Clip",
})


class PolicyError(T2TError, ValueError):
    """A policy name or option that does not exist; the message lists the valid ones."""


@dataclass(frozen=True)
class Policy:
    """A named set of node families whose inputs get Q/DQ."""

    name: str
    families: frozenset[str]
    description: str


POLICIES: dict[str, Policy] = {
    "linear": Policy(
        "linear", frozenset({"linear", "head"}),
        "inputs (activation + weight) of every Linear layer and the head; attention stays fp16",
    ),
    "linear-attn": Policy(
        "linear-attn", frozenset({"linear", "head", "attn_matmul"}),
        "'linear' plus both softmax-attention MatMuls (q@k^T, attn@v): the pattern TensorRT fuses "
        "into an int8 attention kernel",
    ),
    "linear-attn-performer": Policy(
        "linear-attn-performer", frozenset({"linear", "head", "attn_matmul", "performer_matmul"}),
        "'linear-attn' plus the Performer's two feature MatMuls (kp^T@v, qp@kptv)",
    ),
    "all-matmul": Policy(
        "all-matmul", frozenset(FAMILIES),
        "every MatMul/Gemm, including the Performer's feature projection (measured for comparison only)",
    ),
}
# Chosen on the reference checkpoint (the per-family sensitivity of reports/calib-imagenette-t2t_vit_7-families.md):
# the softmax-attention MatMuls cost no more than the Linear layers in int8, while the Performer's
# feature products are the costliest family per node (per-tensor int8 crushes their skewed exp features).
DEFAULT_POLICY = "linear-attn"


@dataclass(frozen=True)
class QuantCandidate:
    """A MatMul/Gemm node with its family and stage."""

    name: str
    op_type: str
    scope: str
    family: str
    stage: str
    const_input: int | None  # index of the constant (weight) input, None for activation x activation

    @property
    def in_t2t(self) -> bool:
        return self.stage.startswith("t2t.")


def node_scope(node: onnx.NodeProto) -> str:
    """Dotted module path of a node ("blocks.0.attn.qkv"), or "" when the exporter recorded none."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = [s for s in ast.literal_eval(scopes) if s]
        except (ValueError, SyntaxError):
            parts = []
        # The last entry names the op call ("linear", "matmul_3"), the ones before are modules.
        if len(parts) >= 2:
            return parts[-2]
        return ""
    if node.name.startswith("/"):
        parts = [p for p in node.name.split("/") if p]
        return ".".join(parts[:-1])
    return ""


def _constant_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names of tensors that are initializers or computed only from initializers/Constants."""
    const = {i.name for i in graph.initializer}
    for n in graph.node:  # graph order is topological (ONNX requires it)
        if n.op_type == "Constant" or (n.input and all((not i) or i in const for i in n.input)
                                       and n.op_type in ("Transpose", "Cast", "Identity", "Reshape",
                                                         "DequantizeLinear")):
            const.update(n.output)
    return const


# Layout-only ops, and Q/DQ pairs (fake quantization keeps the tensor's meaning), so the same structure is
# recognised in the exported graph, in the Q/DQ graph and in the mixed fp16 graph (with its Casts).
_PASS_THROUGH = ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten",
                 "QuantizeLinear", "DequantizeLinear")


def _producer(prod: Mapping[str, onnx.NodeProto], tensor: str, skip: tuple[str, ...] = _PASS_THROUGH):
    """The node producing ``tensor``, looking through layout-only ops."""
    node = prod.get(tensor)
    while node is not None and node.op_type in skip and node.input:
        node = prod.get(node.input[0])
    return node


def _feeds_exp(node: onnx.NodeProto, consumers: Mapping[str, list], hops: int = 4) -> bool:
    """Output reaches an Exp through at most ``hops`` elementwise Sub/Add/Mul (the Performer's phi)."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for c in consumers.get(n.output[0], []):
                if c.op_type == "Exp":
                    return True
                if c.op_type in ("Sub", "Add", "Mul", "Cast"):  # Cast: the mixed graph's island boundary
                    nxt.append(c)
        frontier = nxt
    return False


def _stage_of_ln(index: int, num_ln: int) -> str:
    """LayerNorm k (topological order) -> stage: 2 per T2T attention, 2 per block, 1 final norm."""
    if index < 0:
        return "t2t.attention1"
    if index < 4:
        return f"t2t.attention{index // 2 + 1}"
    if index == num_ln - 1:
        return "head"
    return f"blocks.{(index - 4) // 2}"


def _producers_consumers(graph) -> tuple[dict[str, Any], dict[str, list]]:
    """tensor name -> the node producing it, and tensor name -> the nodes reading it."""
    return _producers(graph), _consumers(graph)


def classify_nodes(model: onnx.ModelProto) -> list[QuantCandidate]:
    """Every MatMul/Gemm of an exported T2T-ViT graph with its family and stage, in graph order.

    The classification is structural, so it holds for any exporter and after onnxslim renamed nodes
    and dropped their scopes:

    * family: constant second input = a Linear layer (``performer_features`` when its output goes
      through Sub into Exp); both inputs activations = ``performer_matmul`` when an input comes from
      Exp (the Performer's features), else ``attn_matmul``; a Gemm, or the MatMul after the final
      LayerNorm = ``head``.
    * stage: the nearest LayerNormalization ancestor (LayerNorms lie on the residual chain, so their
      topological order is unique): two per T2T attention, two per backbone block, then the final norm;
      the MatMul fed by the last soft split (a Conv, no LayerNorm between) is ``t2t.project``.
    """
    graph = model.graph
    const = _constant_inputs(graph)
    prod, consumers = _producers_consumers(graph)
    ln_index = {n.name or id(n): k for k, n in
                enumerate(n for n in graph.node if n.op_type == "LayerNormalization")}
    num_ln = len(ln_index)
    if num_ln < 5:
        raise PolicyError(
            f"the graph has {num_ln} LayerNormalization nodes; a T2T-ViT export has 4 in the T2T stage, 2 per "
            f"block and a final one. Export with opset >= 17 through `make onnx` (python -m export.to_onnx) "
            f"so LayerNorm stays one op"
        )

    def nearest_ln(tensor: str) -> tuple[str, bool]:
        """(stage, reached_conv_first) by breadth-first search back from ``tensor``."""
        seen, frontier = set(), [tensor]
        while frontier:
            nxt = []
            for t in frontier:
                n = prod.get(t)
                if n is None or id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op_type == "LayerNormalization":
                    return _stage_of_ln(ln_index[n.name or id(n)], num_ln), False
                if n.op_type == "Conv":
                    return "t2t.project", True
                nxt.extend(i for i in n.input if i and i not in const)
            frontier = nxt
        return "t2t.attention1", False

    out: list[QuantCandidate] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        const_idx = next((i for i, t in enumerate(node.input[:2]) if t in const), None)
        act = node.input[0] if const_idx != 0 else node.input[1]
        stage, _ = nearest_ln(act)
        if node.op_type == "Gemm" or stage == "head":
            family = "head"
        elif const_idx is not None:
            family = "performer_features" if _feeds_exp(node, consumers) else "linear"
        else:
            srcs = [_producer(prod, t) for t in node.input[:2]]
            from_exp = any(s is not None and (s.op_type == "Exp" or (
                s.op_type == "MatMul" and any(getattr(_producer(prod, t), "op_type", "") == "Exp" for t in s.input)))
                for s in srcs)
            family = "performer_matmul" if from_exp else "attn_matmul"
        out.append(QuantCandidate(node.name, node.op_type, node_scope(node), family, stage, const_idx))
    return out


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise PolicyError(f"unknown quantization policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def select_nodes(candidates: Iterable[QuantCandidate], policy: Policy | str,
                 exclude_t2t: bool = False) -> list[QuantCandidate]:
    """The candidates the policy quantizes (graph order)."""
    if isinstance(policy, str):
        policy = get_policy(policy)
    return [c for c in candidates if c.family in policy.families and not (exclude_t2t and c.in_t2t)]


def group_nodes(candidates: Iterable[QuantCandidate], by: str) -> dict[str, list[QuantCandidate]]:
    """Candidates grouped for sensitivity analysis: ``by="stage"`` (per block) or ``"family"``."""
    if by not in ("stage", "family"):
        raise PolicyError(f"sensitivity grouping must be 'stage' or 'family', got {by!r}")
    groups: dict[str, list[QuantCandidate]] = {}
    for c in candidates:
        groups.setdefault(getattr(c, by), []).append(c)
    return groups


def summarize(selected: Iterable[QuantCandidate]) -> Mapping[str, Mapping[str, int]]:
    """Counts of quantized nodes per stage and family (for printing and reports)."""
    by_stage: dict[str, int] = {}
    by_family: dict[str, int] = {}
    for c in selected:
        by_stage[c.stage] = by_stage.get(c.stage, 0) + 1
        by_family[c.family] = by_family.get(c.family, 0) + 1
    return {"by_stage": by_stage, "by_family": by_family}


@dataclass
class Placement:
    """The result of applying a policy to a graph: what is quantized and what stays fp16."""

    policy: str
    exclude_t2t: bool
    quantized: list[QuantCandidate] = field(default_factory=list)
    kept_float: list[QuantCandidate] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, policy: Policy | str, exclude_t2t: bool = False) -> "Placement":
        pol = get_policy(policy) if isinstance(policy, str) else policy
        cands = classify_nodes(model)
        chosen = select_nodes(cands, pol, exclude_t2t)
        names = {c.name for c in chosen}
        return cls(pol.name, exclude_t2t, chosen, [c for c in cands if c.name not in names])

    @property
    def node_names(self) -> list[str]:
        return [c.name for c in self.quantized]

    def as_dict(self) -> dict:
        return {
            "policy": self.policy,
            "exclude_t2t": self.exclude_t2t,
            "quantized": [{"node": c.name, "scope": c.scope, "family": c.family, "stage": c.stage}
                          for c in self.quantized],
            "kept_float": [{"node": c.name, "scope": c.scope, "family": c.family, "stage": c.stage}
                           for c in self.kept_float],
            "summary": summarize(self.quantized),
        }

    def describe(self, float_type: str = "fp16", nodes: bool = True) -> str:
        """Human-readable summary of the placement, and with ``nodes`` one line per quantized node;
        ``float_type`` is what the others compute in (fp16 in the TensorRT graph, fp32 in the CPU one)."""
        s = summarize(self.quantized)
        lines = [f"policy {self.policy!r}{' (T2T stage excluded)' if self.exclude_t2t else ''}: "
                 f"{len(self.quantized)} MatMul/Gemm nodes get int8 inputs, {len(self.kept_float)} stay {float_type}",
                 "  by family: " + ", ".join(f"{k}={v}" for k, v in sorted(s["by_family"].items())),
                 "  by stage:  " + ", ".join(f"{k}={v}" for k, v in s["by_stage"].items())]
        if nodes:
            lines += [f"    int8  {c.stage:<15} {c.family:<18} {c.name}{'  (' + c.scope + ')' if c.scope else ''}"
                      for c in self.quantized]
        return "\n".join(lines)


def _source(prod: Mapping[str, onnx.NodeProto], tensor: str) -> str:
    """The tensor behind layout ops, Casts and Q/DQ pairs (the kqv split output behind a Cast or a Q/DQ)."""
    node = prod.get(tensor)
    while node is not None and node.op_type in _PASS_THROUGH and node.input:
        tensor = node.input[0]
        node = prod.get(tensor)
    return tensor


def _casts_to_fp16(node: onnx.NodeProto) -> bool:
    """A Cast to float16: the island's exit (to proj, or to the Q of an int8 Performer MatMul)."""
    return node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)


def performer_core_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of every Performer's linear-attention core, in graph order.

    The core is what ``t2t_vit.layers.TokenPerformer`` runs in float32 (``fp32_core``) and what the fp16
    export keeps fp32 behind Casts (``export.patterns.performer_core_fp32``): every node on a path from
    the k, q, v outputs of the ``kqv`` split to the input of ``proj`` (feature MatMuls with ``w``,
    ReduceMax, Exp, ReduceSum, the normaliser D, the rescaled epsilon, the division). Found from the
    graph's structure, like :func:`classify_nodes`, so it holds after onnxslim renamed nodes and in the
    exported, Q/DQ and mixed fp16 graphs alike. Q/DQ nodes and MatMuls fed by DequantizeLinear (int8
    layers, when a policy quantizes Performer MatMuls) are left out: they belong to the int8 pattern;
    so are Casts to float16, which are the island's exits.

    Raises:
        PolicyError: when the structure is not the Performer's (the walk back from ``proj`` leaves it).
    """
    graph = model.graph
    cands = classify_nodes(model)
    const = _constant_inputs(graph)
    prod, consumers = _producers_consumers(graph)
    by_stage: dict[str, list[QuantCandidate]] = {}
    for c in cands:
        if c.family in ("performer_features", "performer_matmul"):
            by_stage.setdefault(c.stage, []).append(c)
    node_by_name: dict[str, onnx.NodeProto] = {}
    for n in graph.node:
        if n.name in node_by_name:
            raise PolicyError(f"two nodes are named {n.name!r}; the fp32 island is given to the fp16 converter by "
                              f"node name, so names must be unique (re-export with python -m export.to_onnx)")
        node_by_name[n.name] = n
    core: set[int] = set()
    for stage, group in by_stage.items():
        names = {c.name for c in group}
        feats = [node_by_name[c.name] for c in group if c.family == "performer_features"]
        mms = [node_by_name[c.name] for c in group if c.family == "performer_matmul"]
        if len(feats) != 2 or len(mms) != 2:
            raise PolicyError(f"{stage}: expected a Performer's 2 feature projections and 2 feature products, "
                              f"found {len(feats)} and {len(mms)}")
        # Entry tensors: k and q (activation inputs of x @ w^T) and v (the input of kp^T @ v that is not
        # an exp feature), each traced back to what the kqv split produced.
        entry = {_source(prod, n.input[0] if n.input[1] in const else n.input[1]) for n in feats}
        for n in mms:
            for t in n.input[:2]:
                src = _producer(prod, t)
                if src is None or (src.op_type != "Exp" and src.name not in names):
                    entry.add(_source(prod, t))
        # Exit: the activation input of proj, the first Linear downstream of the feature products.
        proj, frontier, seen = None, list(mms), set()
        while frontier and proj is None:
            nxt = []
            for n in frontier:
                for c in (c for o in n.output for c in consumers.get(o, [])):
                    if id(c) in seen:
                        continue
                    seen.add(id(c))
                    if c.op_type in ("MatMul", "Gemm") and c.name not in names and any(i in const for i in c.input[:2]):
                        proj = c
                        break
                    nxt.append(c)
                if proj is not None:
                    break
            frontier = nxt
        if proj is None:
            raise PolicyError(f"{stage}: no Linear (proj) after the Performer's feature products")
        exit_t = _source(prod, proj.input[0] if proj.input[1] in const else proj.input[1])
        # Walk back from the exit to the entry tensors; every node met is in the core.
        stack, found = [exit_t], {}
        while stack:
            t = stack.pop()
            if not t or t in entry or t in const:
                continue
            n = prod.get(t)
            if n is None or n.op_type == "LayerNormalization":
                raise PolicyError(f"{stage}: the walk back from proj's input reached "
                                  f"{'a graph input' if n is None else n.name} without passing the kqv split; "
                                  f"this is not the Performer's structure")
            if id(n) in found:
                continue
            found[id(n)] = n
            stack.extend(n.input)
        core.update(k for k, n in found.items()
                    if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and not _casts_to_fp16(n)
                    and not any(getattr(prod.get(i), "op_type", "") == "DequantizeLinear" for i in n.input))
    return [n.name for n in graph.node if id(n) in core]
