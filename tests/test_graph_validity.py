"""Every graph the pipeline writes is a valid ONNX model (the full checker: topological order, types,
opset) and its metadata says what the graph is, for a Performer and a token-transformer model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from calibration.policy import Placement
from calibration.quantize import TensorDataReader, build_qdq, ensure_opset
from export.to_onnx import ExportSettings, export_model
from t2t_vit.checkpoint import build_model
from t2t_vit.graphs import describe_graph

DERIVED = ("opset", "precision", "io_dtype", "fp32_islands", "layernorm_precision")


@pytest.fixture(scope="module", params=["t2t_vit_test", "t2t_vit_t_test"])
def graphs(request, tmp_path_factory):
    """fp32, fp16 (LayerNorm fp16 and fp32) and int8 (LayerNorm fp16 and fp32, one sensitivity graph)."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = build_model(name).eval()
    export_model(model, out, ExportSettings(layernorm="fp16"))
    export_model(model, out / "ln32")  # the default: fp32 LayerNorms
    # Each int8 graph is its export's fp16 graph with Q/DQ, so it has that export's LayerNorms; the sensitivity
    # graph is the default export's (fp32 LayerNorms).
    pairs = {ln: tuple(onnx.load(str(d / f"{name}.{p}.onnx")) for p in ("fp32", "fp16"))
             for ln, d in (("fp16", out), ("fp32", out / "ln32"))}
    fp32 = ensure_opset(pairs["fp32"][0])
    nodes = Placement.from_model(fp32, "linear-attn").node_names
    images = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    paths = {"fp32": out / f"{name}.fp32.onnx", "fp16": out / f"{name}.fp16.onnx",
             "fp16-ln32": out / "ln32" / f"{name}.fp16.onnx"}
    for ln, (f32, f16) in pairs.items():
        path = out / f"{name}.int8-ln{ln}.onnx"
        build_qdq(f32, nodes, "max", TensorDataReader(images), path, fp16_model=f16, cache=out / f"ranges-{ln}.json")
        paths[f"int8-ln{ln}"] = path
    cpu = out / f"{name}.int8-cpu.onnx"
    build_qdq(fp32, nodes, "max", None, cpu, target="cpu", cache=out / "ranges-fp16.json")
    paths["int8-cpu"] = cpu
    only = out / "sensitivity" / f"{name}.int8-max-only-head.onnx"
    build_qdq(fp32, [n for n in nodes if n == nodes[-1]], "max", None, only, fp16_model=pairs["fp32"][1],
               cache=out / "ranges-fp16.json")
    paths["sensitivity"] = only
    return name, paths


KINDS = ["fp32", "fp16", "fp16-ln32", "int8-lnfp16", "int8-lnfp32", "int8-cpu", "sensitivity"]


@pytest.mark.parametrize("kind", KINDS)
def test_graph_passes_the_full_checker(graphs, kind):
    _, paths = graphs
    model = onnx.load(str(paths[kind]))
    onnx.checker.check_model(model, full_check=True)
    # producers before consumers, explicitly (the checker's own message for this is easy to miss)
    seen = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for n in model.graph.node:
        assert all(t in seen for t in n.input), f"{n.name} reads a tensor produced later"
        seen.update(n.output)


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_says_what_the_graph_is(graphs, kind):
    name, paths = graphs
    model = onnx.load(str(paths[kind]))
    meta = {p.key: p.value for p in model.metadata_props}
    derived = describe_graph(model)
    # The metadata's precision names the graph a target gets (int8-cpu is an int8 graph for ONNX Runtime CPU).
    assert {k: meta[k] for k in DERIVED} == {**derived, "precision": "int8-cpu" if kind == "int8-cpu" else derived["precision"]}
    want_precision = kind.split("-")[0] if kind != "sensitivity" else "int8"
    assert derived["precision"] == want_precision
    assert derived["opset"] == str(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    performer = name == "t2t_vit_test"
    want_island = "performer_core_fp32" if performer and want_precision != "fp32" and kind != "int8-cpu" else "none"
    assert derived["fp32_islands"] == want_island
    # fp16 LayerNorms only where the export asked for them; the default (the sensitivity graph's export) is fp32.
    want_ln = "fp16" if kind in ("fp16", "int8-lnfp16") else "fp32"
    assert derived["layernorm_precision"] == want_ln
    if want_precision == "int8":
        assert derived["opset"] == "19"  # raised for fp16 Q/DQ scales, not the fp32 graph's 18


def _chain_graph(order: list[str]) -> onnx.ModelProto:
    """x -> a -> b -> d, x -> c -> d (d reads b and c), nodes listed in ``order``."""
    from onnx import TensorProto, helper

    spec = {"a": (["x"], ["ta"]), "b": (["ta"], ["tb"]), "c": (["x", "w"], ["tc"]), "d": (["tb", "tc"], ["y"])}
    nodes = [helper.make_node("Add" if len(spec[n][0]) == 2 else "Relu",
                              spec[n][0], spec[n][1], name=n) for n in order]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_toposort_orders_level_by_level_in_graph_order():
    """Producers first; a node's level is one past its latest producer's, and nodes of one level keep their
    order in the graph (so an already sorted graph, or one with only an appended Cast, barely moves)."""
    from t2t_vit.graphs import toposort

    model = toposort(_chain_graph(["d", "c", "b", "a"]))
    assert [n.name for n in model.graph.node] == ["c", "a", "b", "d"]  # levels: c, a = 0; b = 1; d = 2
    onnx.checker.check_model(model, full_check=True)
    ordered = _chain_graph(["a", "c", "b", "d"])
    assert [n.name for n in toposort(ordered).graph.node] == ["a", "c", "b", "d"]


def test_toposort_names_what_a_graph_waits_for():
    from t2t_vit.graphs import GraphError, toposort

    model = _chain_graph(["a", "b", "c", "d"])
    model.graph.node[0].input[0] = "tb"  # a reads b's output: a cycle a -> b -> a
    with pytest.raises(GraphError, match=r"3 nodes wait for \['ta', 'tb'\]"):
        toposort(model)
    model = _chain_graph(["a", "b", "c", "d"])
    model.graph.node[2].input[1] = "nowhere"
    with pytest.raises(GraphError, match=r"2 nodes wait for \['nowhere', 'tc'\]"):
        toposort(model)
