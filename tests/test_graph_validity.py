"""Every graph the pipeline writes is a valid ONNX model (the full checker: topological order, types,
opset) and its metadata says what the graph is, for a Performer and a token-transformer model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from calibration.calib import build_int8
from calibration.policy import Placement
from calibration.quantize import TensorDataReader, ensure_opset
from export.to_onnx import export_model
from t2t_vit.checkpoint import build_model
from t2t_vit.graphs import describe_graph, read_metadata

DERIVED = ("opset", "precision", "io_dtype", "fp32_islands", "layernorm_precision")


@pytest.fixture(scope="module", params=["t2t_vit_test", "t2t_vit_t_test"])
def graphs(request, tmp_path_factory):
    """fp32, fp16 (LayerNorm fp16 and fp32) and int8 (LayerNorm fp16 and fp32, one sensitivity graph)."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = build_model(name).eval()
    export_model(model, out, layernorm="fp16")
    export_model(model, out / "ln32")  # the default: fp32 LayerNorms
    fp32 = ensure_opset(onnx.load(str(out / f"{name}.fp32.onnx")))
    nodes = Placement.from_model(fp32, "linear-attn").node_names
    images = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    meta = {**read_metadata(out / f"{name}.fp32.onnx"), "precision": "int8"}
    paths = {"fp32": out / f"{name}.fp32.onnx", "fp16": out / f"{name}.fp16.onnx",
             "fp16-ln32": out / "ln32" / f"{name}.fp16.onnx"}
    for ln in ("fp16", "fp32"):
        path = out / f"{name}.int8-ln{ln}.onnx"
        build_int8(fp32, nodes, "max", TensorDataReader(images), out / f"ranges-{ln}.json", 99.99, meta, path,
                   layernorm=ln)
        paths[f"int8-ln{ln}"] = path
    cpu = out / f"{name}.int8-cpu.onnx"
    build_int8(fp32, nodes, "max", None, out / "ranges-fp16.json", 99.99, {**meta, "precision": "int8-cpu"}, cpu,
               target="cpu")
    paths["int8-cpu"] = cpu
    only = out / "sensitivity" / f"{name}.int8-max-only-head.onnx"
    build_int8(fp32, [n for n in nodes if n == nodes[-1]], "max", None, out / "ranges-fp16.json", 99.99, meta, only)
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
    # fp16 LayerNorms only where asked for; the default (sensitivity graphs too) is fp32.
    want_ln = "fp16" if kind in ("fp16", "int8-lnfp16") else "fp32"
    assert derived["layernorm_precision"] == want_ln
    if want_precision == "int8":
        assert derived["opset"] == "19"  # raised for fp16 Q/DQ scales, not the fp32 graph's 18
