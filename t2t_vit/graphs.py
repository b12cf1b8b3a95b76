"""ONNX files as every stage reads them: metadata, structure maps, float32 tensors, ONNX Runtime sessions.

``onnx`` and ``onnxruntime`` are imported inside the functions that need them, so importing this module
(and :mod:`t2t_vit`) stays light.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .artifacts import make_hint
from .errors import T2TError

__all__ = [
    "GraphError",
    "read_metadata",
    "recorded_checkpoint",
    "graph_mismatch",
    "expect_graph",
    "set_metadata",
    "producers",
    "consumers",
    "default_opset",
    "value_types",
    "fp32_tensors",
    "graph_inputs",
    "onnx_precision",
    "ort_session_options",
    "ort_session",
    "toposort",
    "check_graph",
    "describe_graph",
    "ONNX_FLOAT",
    "ONNX_FLOAT16",
    "ORT_SPINNING_KEYS",
]

ONNX_FLOAT, ONNX_FLOAT16, ONNX_FLOAT8E4M3FN = 1, 10, 17  # onnx.TensorProto.FLOAT / FLOAT16 / FLOAT8E4M3FN
# ONNX Runtime's session config keys for thread-pool spinning (onnxruntime_session_options_config_keys.h;
# https://onnxruntime.ai/docs/performance/tune-performance/threading.html).
ORT_SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


class GraphError(T2TError):
    """An ONNX file that is missing, unreadable or not what the stage expects."""


def _load(path: str | os.PathLike, weights: bool = True) -> Any:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"ONNX file not found: {path} (create it with `make onnx`, or `make calib` for int8)")
    try:
        model = onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # protobuf's DecodeError and friends
        raise GraphError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); re-create it") from e
    # Protobuf parses an empty file (and some truncated ones) as an empty model: no graph to run.
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise GraphError(f"{path} holds no ONNX graph ({path.stat().st_size} bytes: empty, truncated or not an "
                         f"ONNX file); re-create it")
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    return {p.key: p.value for p in _load(path, weights=False).metadata_props}


def recorded_checkpoint(meta: Mapping[str, str]) -> str | None:
    """The checkpoint sha256 a graph's metadata records: the hash, ``""`` for random weights (the exporter
    writes ``none (random weights)`` without a checkpoint), None when the key is absent (older files)."""
    if "checkpoint_sha256" not in meta:
        return None
    v = (meta.get("checkpoint_sha256") or "").strip().lower()
    return "" if (not v or v.startswith(("none", "null", "random"))) else v


def graph_mismatch(meta: Mapping[str, str], *, model: str, precision: str | None = None,
                   checkpoint_sha: str | None = None, against: str = "--checkpoint (CHECKPOINT=)") -> str:
    """Why a graph's recorded metadata contradicts what a stage expects ('' when it does not).

    Args:
        meta: the graph's ``metadata_props`` (:func:`read_metadata`, or an engine sidecar's copy).
        model: the registered model name the stage runs; metadata ``model`` must equal it.
        precision: the graph precision the stage expects (fp32, fp16, int8, int8-cpu); metadata ``precision``
            must equal it. None: not checked.
        checkpoint_sha: the weights the stage expects: a sha256, ``""`` for random weights (then a graph
            exported from a checkpoint is refused), None: not checked. Keys absent from older files pass.
        against: what ``checkpoint_sha`` came from, for the message.
    """
    if meta.get("model") and meta["model"] != model:
        return f"holds {meta['model']} (metadata model), not {model}"
    if precision and meta.get("precision") and meta["precision"] != precision:
        return f"is a {meta['precision']} graph (metadata precision), not the {precision} graph expected here"
    recorded = recorded_checkpoint(meta)
    if checkpoint_sha is None or recorded is None or recorded == checkpoint_sha:
        return ""
    if not checkpoint_sha:
        return (f"was exported from a checkpoint (metadata checkpoint_sha256 {recorded[:12]}) but this run has no "
                f"checkpoint (random weights)")
    if not recorded:
        return f"was exported with random weights (no checkpoint), not from the weights of {against}"
    return (f"was exported from another checkpoint (metadata checkpoint_sha256 {recorded[:12]}, not "
            f"{checkpoint_sha[:12]} of {against})")


def expect_graph(path: str | os.PathLike, *, model: str, precision: str, checkpoint_sha: str | None = None,
                 checkpoint: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 against: str = "--checkpoint (CHECKPOINT=)") -> dict[str, str]:
    """Read a graph a stage is about to use and check its recorded model, precision and checkpoint
    (:func:`graph_mismatch`); returns its metadata. The one check every stage that takes a graph runs.

    Raises:
        GraphError: missing, unreadable, empty or not the graph expected; one line naming the make command
            that makes the right one (``checkpoint``/``out`` fill in its CHECKPOINT=/OUT=).
    """
    path = Path(path)
    hint = make_hint(precision, model, checkpoint, out)
    if not path.is_file():
        raise GraphError(f"{path} not found: create it with {hint}")
    meta = read_metadata(path)
    why = graph_mismatch(meta, model=model, precision=precision, checkpoint_sha=checkpoint_sha, against=against)
    if why:
        raise GraphError(f"{path} {why}: re-create it with {hint}")
    return meta


def set_metadata(model: Any, meta: Mapping[str, Any]) -> None:
    """Replace a ModelProto's ``metadata_props`` with ``meta`` (values stringified)."""
    import onnx

    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {str(k): str(v) for k, v in meta.items()})


def producers(graph: Any) -> dict[str, Any]:
    """tensor name -> the node that produces it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: Any) -> dict[str, list[Any]]:
    """tensor name -> the nodes that read it (in graph order)."""
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def default_opset(model: Any) -> int:
    """The model's ai.onnx opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def value_types(model: Any, inferred: Any = None) -> dict[str, int]:
    """tensor name -> ONNX element type, from shape inference plus the initializers."""
    import onnx

    inferred = inferred if inferred is not None else onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def fp32_tensors(model: Any) -> list[dict[str, str]]:
    """Tensors of a reduced-precision graph that are float32 (graph I/O excluded) and float32
    initializers, each with the node that makes it (``"initializer"`` for constants)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    prod = producers(model.graph)
    out = []
    for vi in inferred.graph.value_info:
        if vi.type.tensor_type.elem_type == ONNX_FLOAT and vi.name not in io:
            p = prod.get(vi.name)
            out.append({"tensor": vi.name, "producer": f"{p.op_type}:{p.name}" if p is not None else "?"})
    out += [{"tensor": i.name, "producer": "initializer"} for i in model.graph.initializer
            if i.data_type == ONNX_FLOAT]
    return out


def graph_inputs(path: str | os.PathLike) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) -> dims: an int, or the symbolic name of a dynamic axis."""
    model = _load(path, weights=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs
            continue
        inputs[value.name] = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                              for d in value.type.tensor_type.shape.dim]
    return inputs


def onnx_precision(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """Precision of an exported graph: metadata ``precision``, else the ``<model>.<precision>.onnx`` name."""
    if metadata and metadata.get("precision"):
        return str(metadata["precision"])
    parts = Path(path).name.split(".")
    if len(parts) >= 3:
        return parts[-2]
    return "fp32"


def ort_session_options(threads: int | None = None, optimize: bool = True, profile_prefix: str | None = None,
                        optimized_model: str | os.PathLike | None = None, spinning: bool | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads (None: ORT's default, all cores) and one
    inter-op thread; all graph optimizations unless ``optimize`` is False; optional profiling and saving
    of the optimized graph (ORT's own start-up cache).

    ``spinning``: whether idle pool threads busy-wait for the next piece of work (ORT's
    ``session.intra_op.allow_spinning`` / ``session.inter_op.allow_spinning``; None keeps ORT's default,
    on). Spinning saves a wake-up per parallel section when the cores are the runner's alone; when other
    processes need the same cores (a server's network threads, its clients) the spinning threads take
    their CPU time, so a server turns it off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if spinning is not None:
        for pool in ORT_SPINNING_KEYS:
            so.add_session_config_entry(pool, "1" if spinning else "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if optimized_model:
        so.optimized_model_filepath = str(optimized_model)
    so.log_severity_level = 3
    return so


def ort_session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True,
                provider: str = "cpu", **options: Any) -> Any:
    """An ONNX Runtime inference session on the CPU (or ``provider="cuda"``) provider."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"ONNX file not found: {path} (create it with `make onnx`, or `make calib` for int8)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=ort_session_options(threads, optimize, **options),
                                providers=providers)


def toposort(model: Any) -> Any:
    """Reorder the main graph's nodes topologically (in place). Graph rewrites that append nodes (fp16
    converters) leave a node before its producer; ONNX requires producers first.

    A layered Kahn sort, linear in nodes and edges: a node's level is one more than its latest producer's
    (0 when it reads only graph inputs and initializers); nodes come out level by level, each level in
    the graph's order. A sorted graph is left as it is.

    Raises:
        GraphError: the graph has a cycle or reads a tensor nothing produces.
    """
    graph = model.graph
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    readers: dict[int, list[int]] = {}
    waiting = [0] * len(nodes)  # producers not yet placed
    for i, n in enumerate(nodes):
        for p in {made_by[t] for t in n.input if t not in available and t in made_by}:
            readers.setdefault(p, []).append(i)
            waiting[i] += 1
    unmade = {i for i, n in enumerate(nodes) if any(t not in available and t not in made_by for t in n.input)}
    level = [0] * len(nodes)
    queue = [i for i in range(len(nodes)) if not waiting[i] and i not in unmade]
    placed = 0
    while placed < len(queue):
        i = queue[placed]
        placed += 1
        for r in readers.get(i, ()):
            level[r] = max(level[r], level[i] + 1)
            waiting[r] -= 1
            if not waiting[r] and r not in unmade:
                queue.append(r)
    if placed < len(nodes):
        done = set(queue)
        known = available | {o for i in done for o in nodes[i].output}
        missing = sorted({t for i, n in enumerate(nodes) if i not in done for t in n.input if t not in known})[:5]
        raise GraphError(f"the graph cannot be ordered: {len(nodes) - placed} nodes wait for {missing}")
    by_level: list[list[int]] = [[] for _ in range(max(level, default=0) + 1)]
    for i in range(len(nodes)):  # graph order within a level
        by_level[level[i]].append(i)
    order = [i for same in by_level for i in same]
    if order != list(range(len(nodes))):
        copies = [type(nodes[i])() for i in order]
        for c, i in zip(copies, order):
            c.CopyFrom(nodes[i])
        del graph.node[:]
        graph.node.extend(copies)
    return model


def check_graph(model: Any) -> None:
    """``onnx.checker.check_model(full_check=True)``: topological order, types, opset, shape inference."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphError(f"the graph is not a valid ONNX model: {e}") from e


def _has_fp8_qdq(model: Any) -> bool:
    """Any QuantizeLinear/DequantizeLinear whose zero point is a float8e4m3fn initializer."""
    zps = {n.input[2] for n in model.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2]}
    return any(i.name in zps and i.data_type == ONNX_FLOAT8E4M3FN for i in model.graph.initializer)


def describe_graph(model: Any) -> dict[str, str]:
    """Facts read from a graph itself, for its metadata (so the metadata cannot contradict the graph).

    * ``opset``: the ai.onnx opset;
    * ``precision``: ``fp8`` when it holds Q/DQ with float8e4m3fn zero points, ``int8`` for other
      QuantizeLinear/DequantizeLinear, ``fp16`` when any tensor is
      float16, else ``fp32``;
    * ``io_dtype``: the input's element type (``float32``/``float16``);
    * ``fp32_islands``: in a graph that holds float16 (fp16, or TensorRT's int8), ``performer_core_fp32`` when
      float32 tensors other than the graph I/O and the LayerNorms' are computed inside (the Performer
      core), else ``none`` (also for an fp32 graph and the all-fp32 CPU int8 graph: no island to speak of);
    * ``layernorm_precision``: the type LayerNormalization nodes compute in (``fp32``/``fp16``/``mixed``).
    """
    types = value_types(model)
    prod = producers(model.graph)
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    ops = {n.op_type for n in model.graph.node}
    has_fp16 = any(t == ONNX_FLOAT16 for t in types.values())
    precision = ("fp8" if _has_fp8_qdq(model) else "int8") if {"QuantizeLinear", "DequantizeLinear"} & ops else (
        "fp16" if has_fp16 else "fp32")
    ln_types = {types.get(n.input[0]) for n in model.graph.node if n.op_type == "LayerNormalization"}
    ln = ("fp32" if ln_types == {ONNX_FLOAT} else "fp16" if ln_types == {ONNX_FLOAT16} else
          "mixed" if ln_types else "none")
    island = "none"
    if has_fp16:
        ln_tensors = {t for n in model.graph.node if n.op_type == "LayerNormalization" for t in (*n.input, *n.output)}
        for name, t in types.items():
            if t != ONNX_FLOAT or name in io or name in ln_tensors or name not in prod:
                continue
            p = prod[name]
            if p.op_type == "Cast" and p.output[0] in ln_tensors:
                continue
            island = "performer_core_fp32"
            break
    elem = model.graph.input[0].type.tensor_type.elem_type
    return {"opset": str(default_opset(model)), "precision": precision,
            "io_dtype": {ONNX_FLOAT: "float32", ONNX_FLOAT16: "float16"}.get(elem, str(elem)),
            "fp32_islands": island, "layernorm_precision": ln}
