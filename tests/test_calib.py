"""INT8 calibration stage: placement policy, Q/DQ structure, calibration set, cache, report, exit codes.

Everything runs on t2t_vit_test (64 px) with synthetic ImageFolder trees of a few images, so no test
needs ../shared/data. The int8 graph keeps the fp16 export's fp32 island (the Performer cores): checked
against the exporter's own fp32 tensors, the module scopes and the PyTorch ``w`` buffer.
"""
from __future__ import annotations

import collections
import json
import re
import shutil
from types import SimpleNamespace as types_namespace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from PIL import Image

import t2t_vit  # noqa: F401  (registers the models)
from calibration import data as cdata
from calibration.policy import NEVER_QUANTIZED_OPS, Placement, classify_nodes, performer_core_nodes
from calibration.quantize import (QuantizationError, TensorDataReader, build_qdq, check_qdq, ensure_opset,
                                  quantize_model, to_cpu_int8)
from export.settings import METADATA_KEY, ExportError, ExportSettings
from t2t_vit.data import DataConfig, DataError
from t2t_vit.graphs import read_metadata

pytestmark = pytest.mark.timeout(300)  # generous: the module's export fixture runs in the first test's setup

WNIDS = ["n01440764", "n02102040", "n02979186"]  # ImageNet wnids: labels 0, 217, 482 for 1000-class models


def _make_folder(root: Path, per_class: int, classes=WNIDS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(72, 80, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{c}_{i}.jpg")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """<dir>/t2t_vit_test.{fp32,fp16}.onnx from the exporter (random weights); the fp16 graph with fp16
    LayerNorms, so its only fp32 tensors are the Performer cores'."""
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model

    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    export_model(build_model("t2t_vit_test").eval(), out, ExportSettings(layernorm="fp16"))
    return out


@pytest.fixture(scope="module")
def fp32(exported) -> onnx.ModelProto:
    return ensure_opset(onnx.load(str(exported / "t2t_vit_test.fp32.onnx")))


@pytest.fixture(scope="module")
def fp16(exported) -> onnx.ModelProto:
    return onnx.load(str(exported / "t2t_vit_test.fp16.onnx"))


def _trt_int8(fp32: onnx.ModelProto, fp16: onnx.ModelProto, policy: str, x: np.ndarray,
              path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """build_qdq's TensorRT graph (the fp16 export with Q/DQ) and its quantized nodes' names."""
    placement = Placement.from_model(fp32, policy)
    build_qdq(fp32, placement, "max", TensorDataReader(x), path, fp16_model=fp16)
    model = onnx.load(str(path))
    prod = {o: n for n in model.graph.node for o in n.output}
    # the fp16 graph's names for the policy's nodes: the MatMul/Gemm nodes that read a DequantizeLinear
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
             and getattr(prod.get(n.input[0]), "op_type", "") == "DequantizeLinear"]
    assert len(names) == len(placement.node_names)
    return model, names


@pytest.fixture(scope="module")
def int8(fp32, fp16, tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((6, 3, 64, 64), dtype=np.float32)
    model, names = _trt_int8(fp32, fp16, "linear-attn", x, tmp_path_factory.mktemp("int8") / "m.int8.onnx")
    return model, types_namespace(node_names=names)


# ---- placement policy ---------------------------------------------------------------------------------

def test_structural_classification_matches_module_scopes(tmp_path):
    """Families/stages found from graph structure agree with the module names a TorchScript export keeps."""
    from t2t_vit.checkpoint import build_model

    model = build_model("t2t_vit_test").eval()
    model.set_soft_split_impl("grouped")
    model.set_fused_attn(False)
    path = tmp_path / "ts.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=19, dynamo=False)
    cands = classify_nodes(onnx.load(str(path)))
    assert len(cands) == 30
    for c in cands:
        scope = ".".join(p for p in c.name.split("/")[1:-1])  # /blocks.0/attn/qkv/MatMul -> blocks.0.attn.qkv
        if scope.startswith("blocks."):
            assert c.stage == "blocks." + scope.split(".")[1], c
        elif scope.startswith("tokens_to_token.attention"):
            assert c.stage == "t2t." + scope.split(".")[1], c
        elif scope == "tokens_to_token.project":
            assert c.stage == "t2t.project", c
        else:
            assert scope == "head" and c.stage == "head", c
        leaf = scope.split(".")[-1]
        if scope == "head":
            assert c.family == "head"
        elif leaf in ("kqv", "qkv", "proj", "fc1", "fc2", "project", "0", "2"):
            assert c.family == "linear", c
        elif scope.endswith(".attn"):
            assert c.family == "attn_matmul", c
        else:  # the Performer's own MatMuls: x @ w^T (features) and the two feature products
            assert c.family in ("performer_features", "performer_matmul"), c
    fam = [c.family for c in cands]
    assert fam.count("performer_features") == 4 and fam.count("performer_matmul") == 4


def test_exclude_t2t_and_policies(fp32):
    everything = Placement.from_model(fp32, "all-matmul")
    linear = Placement.from_model(fp32, "linear")
    no_t2t = Placement.from_model(fp32, "linear-attn", exclude_t2t=True)
    assert len(everything.quantized) == 30 and not everything.kept_float
    assert {c.family for c in linear.quantized} == {"linear", "head"}
    assert no_t2t.quantized and all(not c.stage.startswith("t2t.") for c in no_t2t.quantized)
    assert any(c.stage.startswith("t2t.") for c in no_t2t.kept_float)
    assert "int8" in no_t2t.describe()


# ---- Q/DQ structure -----------------------------------------------------------------------------------

def test_qdq_structure_is_tensorrt_pattern(int8):
    model, placement = int8
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    wanted = set(placement.node_names)
    dq_consumers = set()
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
        if n.op_type == "DequantizeLinear":
            for c in g.node:
                if n.output[0] in c.input:
                    assert c.op_type not in NEVER_QUANTIZED_OPS, c.op_type
                    dq_consumers.add(c.name)
    assert dq_consumers == wanted  # exactly the policy's nodes run in int8
    for n in g.node:
        if n.name not in wanted:
            continue
        for t in n.input[:2]:
            dq = prod[t]
            assert dq.op_type == "DequantizeLinear"
            scale = numpy_helper.to_array(inits[dq.input[1]])
            assert inits[dq.input[1]].data_type == TensorProto.FLOAT16  # mixed fp16 graph
            if dq.input[0] in inits:  # int8 weight, one scale per output channel
                w = inits[dq.input[0]]
                assert w.data_type == TensorProto.INT8
                axis = next(a.i for a in dq.attribute if a.name == "axis")
                out_axis = 0 if n.op_type == "Gemm" else 1
                assert axis == out_axis and scale.shape == (w.dims[out_axis],)
            else:
                assert scale.size == 1 and prod[dq.input[0]].op_type == "QuantizeLinear"
    # fp32 initializers: only the ones the Performer cores alone read (w and the cores' constants)
    core = _core_by_scope(model)
    for i in g.initializer:
        if i.data_type == TensorProto.FLOAT:
            readers = [n.name for n in g.node if i.name in n.input]
            assert readers and set(readers) <= core, (i.name, readers)
    assert check_qdq(model, wanted)["quantized_nodes"] == len(wanted)


# ---- the Performer core's fp32 island (as in the fp16 export) ---------------------------------------------

_CORE_SCOPE = re.compile(r"^/(model/)?tokens_to_token/attention[12]/[A-Za-z]+(_\d+)?$")


def _core_by_scope(model: onnx.ModelProto) -> set[str]:
    """The Performer cores named by the TorchScript exporter's module scopes (independent of the structural
    search): ops directly in tokens_to_token.attention{1,2} (kqv, proj, mlp, norm are sub-scopes), minus
    the kqv Split and the residual Adds v + proj(y) and x + mlp(x)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    out = set()
    for n in model.graph.node:
        if not _CORE_SCOPE.match(n.name) or n.op_type == "Split":
            continue
        if n.op_type == "Add" and any(s in getattr(prod.get(t), "name", "") for t in n.input for s in ("/proj/", "/mlp/")):
            continue
        out.add(n.name)
    return out


def _pure_fp16_export(tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32 and fp16 graphs of the export fixture's model without the fp32 island (and fp16 LayerNorms)."""
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model

    torch.manual_seed(0)
    out = tmp_path / "pure"
    export_model(build_model("t2t_vit_test").eval(), out, ExportSettings(fp32_core=False, layernorm="fp16"))
    return (ensure_opset(onnx.load(str(out / "t2t_vit_test.fp32.onnx"))),
            onnx.load(str(out / "t2t_vit_test.fp16.onnx")))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.fixture(scope="module")
def performer_w() -> list[np.ndarray]:
    """w^T of both Performers, from the PyTorch model the export fixture exported (same seed)."""
    from t2t_vit.checkpoint import build_model

    torch.manual_seed(0)
    m = build_model("t2t_vit_test").eval()
    return [getattr(m.tokens_to_token, f"attention{i}").w.detach().numpy().T for i in (1, 2)]


def test_structural_core_is_the_exporters_fp32_island(exported, fp32):
    """The structural core search finds, in the fp16 export, exactly the nodes torch wrote in float32, and in
    the fp32 export the nodes of the Performer scopes."""
    from t2t_vit.graphs import fp32_tensors

    fp16 = onnx.load(str(exported / "t2t_vit_test.fp16.onnx"))
    torch_fp32 = {t["producer"].split(":", 1)[1] for t in fp32_tensors(fp16) if ":" in t["producer"]}
    assert len(torch_fp32) > 40
    assert set(performer_core_nodes(fp16)) == torch_fp32
    core = performer_core_nodes(fp32)
    assert set(core) == _core_by_scope(fp32) and len(core) == len(torch_fp32) - 6  # fp16 graph: + 3 Casts in each


def test_int8_graph_keeps_performer_core_fp32(int8, performer_w):
    """Exp/ReduceSum/ReduceMax, y/D and the feature MatMuls (with w unrounded) are float32; the rest float16."""
    model, _ = int8
    g = model.graph
    types = _elem_types(model)
    inits = {i.name: i for i in g.initializer}
    ops = {}
    for n in g.node:
        ops.setdefault(n.op_type, []).append(n)
    for op in ("Exp", "ReduceSum", "ReduceMax"):  # only the Performer uses them (LayerNorm/Softmax are one op)
        assert ops[op] and all(types[n.output[0]] == TensorProto.FLOAT for n in ops[op]), op
    for op in ("LayerNormalization", "Softmax", "Erf", "DequantizeLinear", "Conv"):
        assert ops[op] and all(types[n.output[0]] == TensorProto.FLOAT16 for n in ops[op]), op
    # y / D feeds proj (through a Cast to fp16); the other Divs are GELU's x / sqrt(2), fp16
    consumers = {t: [c for c in g.node if t in c.input] for n in ops["Div"] for t in n.output}
    core_div = [n for n in ops["Div"] if not any(c.op_type == "Erf" for c in consumers[n.output[0]])]
    assert len(core_div) == 2 and all(types[n.output[0]] == TensorProto.FLOAT for n in core_div)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in ops["Div"] if n not in core_div)
    assert all(c.op_type == "Cast" for n in core_div for c in consumers[n.output[0]])
    # feature MatMuls x @ w^T: w float32, bit-equal to the fp16 export's (the half model's w, so fp16-rounded:
    # the int8 graph is the export's fp16 graph, island included)
    feats = [n for n in ops["MatMul"] if n.input[1] in inits and inits[n.input[1]].data_type == TensorProto.FLOAT
             and any(np.array_equal(numpy_helper.to_array(inits[n.input[1]]), w.astype(np.float16).astype(np.float32))
                     for w in performer_w)]
    assert len(feats) == 4 and all(types[n.output[0]] == TensorProto.FLOAT for n in feats)
    # every float32 tensor is made inside the cores (or by the graph I/O Casts)
    io = {v.name for v in list(g.input) + list(g.output)}
    core = _core_by_scope(model)
    for n in g.node:
        for o in n.output:
            if types.get(o) == TensorProto.FLOAT and o not in io:
                assert n.name in core or (n.op_type == "Cast" and "/tokens_to_token/attention" in n.name), n.name


def test_int8_core_computes_in_fp32(fp32, fp16, tmp_path):
    """The int8 graph's Performer output y/D, given its own fp16 k, q, v, equals TokenPerformer's
    linear_attention run in float64 on them to fp32 accuracy; an all-fp16 conversion is 100x further off."""
    import onnxruntime as ort

    from t2t_vit.checkpoint import build_model

    torch.manual_seed(0)
    # the half model's Performer (w rounded to fp16, as the fp16 export and so the int8 graph hold it), in float64
    performer = build_model("t2t_vit_test").eval().tokens_to_token.attention1.half().double()
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64), dtype=np.float32)

    def rel_error(model: onnx.ModelProto) -> float:
        split = next(n for n in model.graph.node if n.op_type == "Split" and "attention1" in n.name)
        div = next(n for n in model.graph.node if n.op_type == "Div" and n.name.endswith("attention1/Div"))
        names = list(split.output) + [div.output[0]]
        types = _elem_types(model)
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, types[t], None) for t in names)
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        k, q, v, y = (torch.from_numpy(a.astype(np.float64)) for a in sess.run(names, {"input": x}))
        with torch.no_grad():
            ref = performer.linear_attention(k, q, v)
        return float((y - ref).abs().max() / ref.abs().max())

    island = rel_error(_trt_int8(fp32, fp16, "linear-attn", x, tmp_path / "island.onnx")[0])
    # the export without the island (ExportSettings(fp32_core=False)): its fp16 graph, quantized the same way
    pure = _pure_fp16_export(tmp_path)
    all_fp16 = rel_error(_trt_int8(*pure, "linear-attn", x, tmp_path / "pure.onnx")[0])
    assert island < 1e-5 and all_fp16 > 100 * island, (island, all_fp16)


@pytest.mark.parametrize("policy", ["all-matmul", "linear-attn-performer"])
def test_island_around_int8_performer_matmuls(fp32, fp16, policy, tmp_path):
    """Policies that quantize Performer MatMuls: those stay int8 (Q/DQ, fp16 scales) inside the fp32 core."""
    import onnxruntime as ort

    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64), dtype=np.float32)
    model, names = _trt_int8(fp32, fp16, policy, x, tmp_path / "m.onnx")
    summary = check_qdq(model, names, layernorm="fp16")
    assert summary["quantized_nodes"] == len(names) and summary["fp32_island_nodes"] > 40
    types = _elem_types(model)
    assert all(types[n.output[0]] == TensorProto.FLOAT for n in model.graph.node if n.op_type == "Exp")
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.isfinite(y).all()


def test_check_qdq_fails_when_the_island_is_dropped(tmp_path):
    """The int8 graph of an export without the island (fp32_core=False) is all fp16: check_qdq, told to expect
    the island, names it; the int8 step itself follows that export's recipe and builds it without one."""
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    dropped, names = _trt_int8(*_pure_fp16_export(tmp_path), "linear-attn", x, tmp_path / "m.onnx")
    assert not any(i.data_type == TensorProto.FLOAT for i in dropped.graph.initializer)
    with pytest.raises(QuantizationError, match="fp32 island was dropped"):
        check_qdq(dropped, names, layernorm="fp16")
    check_qdq(dropped, names, fp32_island=False, layernorm="fp16")  # the rest of the pattern is intact


def test_check_qdq_rejects_fp32_initializer_outside_island(int8):
    model, placement = int8
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    ln = next(n for n in bad.graph.node if n.op_type == "LayerNormalization")
    gamma = next(i for i in bad.graph.initializer if i.name == ln.input[1])
    gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma).astype(np.float32), gamma.name))
    with pytest.raises(QuantizationError, match=f"initializer {re.escape(gamma.name)} is still fp32"):
        check_qdq(bad, placement.node_names, layernorm="fp16")


def test_check_qdq_rejects_nonzero_zero_point(int8):
    model, placement = int8
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in bad.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    with pytest.raises(QuantizationError, match="non-zero zero point"):
        check_qdq(bad, placement.node_names)


def test_int8_graph_runs_on_ort_cpu_close_to_fp32(int8, fp32):
    import onnxruntime as ort

    model, _ = int8
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    y = sess.run(None, {"input": x})[0]
    assert y.shape == ref.shape and np.isfinite(y).all()
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max() + 1e-3  # int8 noise, not a different function


def test_cls_only_last_block_graph_quantizes_like_the_whole_one(tmp_path):
    """The cls-only last block (``--cls-only-last-block``) splits that block's qkv projection into q (class
    token) and kv (every token): one more Linear, every other family and stage as in the whole graph; both
    int8 targets keep their Q/DQ pattern and stay close to fp32."""
    import onnxruntime as ort

    from export.to_onnx import export_onnx
    from t2t_vit.checkpoint import build_model

    torch.manual_seed(0)
    model = build_model("t2t_vit_test").eval()
    graphs = {cls: ensure_opset(onnx.load(str(export_onnx(model, tmp_path / f"{cls}.onnx", "fp32",
                                                          settings=ExportSettings(cls_only_last_block=cls)))))
              for cls in (False, True)}
    cands = {cls: classify_nodes(g) for cls, g in graphs.items()}
    families = {cls: collections.Counter(c.family for c in cs) for cls, cs in cands.items()}
    assert families[True] - families[False] == collections.Counter({"linear": 1})
    assert not families[False] - families[True]
    last = f"blocks.{len(model.blocks) - 1}"
    assert collections.Counter(c.stage for c in cands[True])[last] == 7  # q, kv, 2 attention, proj, fc1, fc2
    x = np.random.default_rng(0).standard_normal((6, 3, 64, 64), dtype=np.float32)
    nodes = Placement.from_model(graphs[True], "linear-attn").node_names
    fp16 = export_onnx(model, tmp_path / "True.fp16.onnx", "fp16", settings=ExportSettings(cls_only_last_block=True))
    _trt_int8(graphs[True], onnx.load(str(fp16)), "linear-attn", x, tmp_path / "True.int8.onnx")  # checked inside
    qdq = quantize_model(graphs[True], nodes, "max", reader=TensorDataReader(x))
    cpu = to_cpu_int8(qdq)
    check_qdq(cpu, nodes, mixed_fp16=False)
    ref = ort.InferenceSession(graphs[True].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    y = ort.InferenceSession(cpu.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max() + 1e-3


# ---- calibration set and cache -------------------------------------------------------------------------

def test_selection_is_deterministic_and_class_balanced(tmp_path):
    root = _make_folder(tmp_path / "train", per_class=5)
    a = cdata.select_samples(root, 7, seed=0)
    b = cdata.select_samples(root, 7, seed=0)
    c = cdata.select_samples(root, 7, seed=1)
    assert a == b and a != c
    counts = sorted(sum(1 for s in a if Path(s.path).parent.name == w) for w in WNIDS)
    assert counts == [2, 2, 3]


def test_clear_errors(tmp_path):
    root = _make_folder(tmp_path / "train", per_class=2)
    with pytest.raises(DataError, match="fewer than the 10 requested"):
        cdata.select_samples(root, 10)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.jpg")
    with pytest.raises(DataError, match="no class sub-folders"):
        cdata.select_samples(loose, 1)


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "train", per_class=2)
    cfg = DataConfig(img_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    samples = cdata.select_samples(root, 4)
    first = cdata.load_or_preprocess(samples, cfg, tmp_path / "cache", progress=False)
    assert not first.from_cache and first.images.shape == (4, 3, 64, 64)

    def no_decode(*a, **k):
        raise AssertionError("the second run decoded images instead of using the cache")

    monkeypatch.setattr(cdata, "ImageBatcher", no_decode)
    second = cdata.load_or_preprocess(samples, cfg, tmp_path / "cache", progress=False)
    assert second.from_cache and torch.equal(second.images, first.images)
    assert second.cache_path == first.cache_path
    # another preprocessing is another key (so it would decode again)
    other = DataConfig(img_size=64, mean=cfg.mean, std=cfg.std, crop_pct=1.0)
    assert cdata.selection_key(samples, other) != cdata.selection_key(samples, cfg)


# ---- the command: report numbers and exit codes ------------------------------------------------------

@pytest.fixture(scope="module")
def calib_run(exported, tmp_path_factory):
    from calibration.calib import main

    base = tmp_path_factory.mktemp("calib")
    out = base / "out"
    out.mkdir()
    for p in ("fp32", "fp16"):
        shutil.copy(exported / f"t2t_vit_test.{p}.onnx", out)
    train = _make_folder(base / "train", per_class=3, seed=1)
    val = _make_folder(base / "val", per_class=2, seed=2)
    argv = ["--model", "t2t_vit_test", "--out", str(out), "--calib-data", str(train), "--calib-size", "6",
            "--val-data", str(val), "--method", "max,entropy", "--workers", "0", "--no-progress",
            "--sensitivity", "family"]
    rc = main(argv)
    return rc, argv, out, val


def test_calib_report_matches_independent_computation(calib_run):
    import onnxruntime as ort

    from t2t_vit.data import imagenet_wnids

    rc, _, out, val = calib_run
    assert rc == 0
    report = json.loads((out / "t2t_vit_test.calib.json").read_text())
    assert (out / "t2t_vit_test.calib.md").read_text().startswith("# INT8 calibration")
    assert (out / "t2t_vit_test.int8.onnx").is_file() and (out / "t2t_vit_test.int8-entropy.onnx").is_file()
    meta = {p.key: p.value for p in onnx.load(str(out / "t2t_vit_test.int8.onnx")).metadata_props}
    assert meta["precision"] == "int8" and meta["calib_method"] == "max" and meta["img_size"] == "64"
    fp16_meta = {p.key: p.value for p in onnx.load(str(out / "t2t_vit_test.fp16.onnx")).metadata_props}
    assert meta["fp32_islands"] == fp16_meta["fp32_islands"] == "performer_core_fp32"
    island = report["int8"]["max"]["fp32_island"]
    assert report["fp32_island"]["nodes"] == len(island["nodes"]) > 40 and report["fp32_island"]["reason"]
    assert {t["tensor"] for t in island["fp32_tensors"]} >= {i.name for i in onnx.load(
        str(out / "t2t_vit_test.int8.onnx")).graph.initializer if i.data_type == TensorProto.FLOAT}
    assert "stays float32" in (out / "t2t_vit_test.calib.md").read_text()
    assert set(report["sensitivity"]["groups"]) == {"linear", "attn_matmul", "head"}

    # independent: timm eval transform by hand, plain ORT sessions, numpy metrics
    cfg = DataConfig.from_metadata(meta)
    tf = cfg.eval_transform()
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    files = sorted(val.rglob("*.jpg"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files]).numpy()
    y = np.array([wnid_index[f.parent.name] for f in files])

    def logits(name):
        s = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        return s.run(None, {"input": x})[0]

    ref, q = logits("t2t_vit_test.fp32.onnx"), logits("t2t_vit_test.int8.onnx")
    acc = report["accuracy"]
    assert acc["fp32"]["images"] == len(files)
    assert acc["fp32"]["top1"] == pytest.approx(100 * np.mean(ref.argmax(1) == y))
    top5 = np.argsort(-q, axis=1)[:, :5]
    assert acc["int8-max"]["top5"] == pytest.approx(100 * np.mean([yy in t for yy, t in zip(y, top5)]))
    assert acc["int8-max"]["top1_agreement"] == pytest.approx(100 * np.mean(ref.argmax(1) == q.argmax(1)))
    assert acc["int8-max"]["mean_abs_dlogit"] == pytest.approx(np.abs(q - ref).mean(), rel=1e-3, abs=1e-6)
    assert acc["int8-max"]["max_abs_dlogit"] == pytest.approx(np.abs(q - ref).max(), rel=1e-3, abs=1e-6)


def test_rerun_hits_cache_and_threshold_fails(calib_run, monkeypatch, capsys):
    """A second run decodes nothing, and a drop above --max-drop exits 1 with the reason."""
    from calibration import calib

    rc, argv, out, _ = calib_run
    report = json.loads((out / "t2t_vit_test.calib.json").read_text())
    drop = report["primary"]["top1_drop"]

    real = cdata.ImageBatcher
    calls = []

    def counting(samples, *a, **k):
        calls.append(len(samples))
        return real(samples, *a, **k)

    monkeypatch.setattr(cdata, "ImageBatcher", counting)  # calibration images come through this name only
    argv2 = [a for a in argv if a not in ("--sensitivity", "family")] + ["--max-drop", str(drop - 0.5)]
    rc2 = calib.main(argv2)
    assert calls == []  # cache hit: no calibration image decoded
    assert rc2 == 1
    err = capsys.readouterr().err
    assert "dropped" in err and "--max-drop" in err
    again = json.loads((out / "t2t_vit_test.calib.json").read_text())
    assert again["calibration"]["cache_hit"] is True
    assert all(v["ranges_reused"] for v in again["int8"].values())


def test_missing_or_stale_export_is_refused_not_made(exported, tmp_path):
    """calib never exports (make onnx validates and reports its graphs): a missing fp32 graph, or one from
    other weights than --checkpoint, is refused with the make onnx command."""
    from calibration import calib
    from t2t_vit.graphs import GraphError

    root = _make_folder(tmp_path / "train", per_class=1)
    args = calib.get_args_parser().parse_args(["--model", "t2t_vit_test", "--out", str(tmp_path / "o"),
                                               "--calib-data", str(root)])
    with pytest.raises(GraphError, match="not found: create it with `make onnx MODEL=t2t_vit_test"):
        calib.ensure_fp32_onnx(args, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    shutil.copytree(exported, tmp_path / "o")
    assert calib.ensure_fp32_onnx(args, tmp_path / "o") == tmp_path / "o" / "t2t_vit_test.fp32.onnx"
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    args.checkpoint = str(ckpt)  # the graph was exported with random weights, not from this checkpoint
    with pytest.raises(GraphError, match=r"random weights.*`make onnx MODEL=t2t_vit_test CHECKPOINT="):
        calib.ensure_fp32_onnx(args, tmp_path / "o")


def test_strided_max_calibration_covers_every_image(fp32, tmp_path):
    """MinMax ranges over several strides equal max |x| over ALL images (computed by a plain ORT run)."""
    import onnxruntime as ort

    placement = Placement.from_model(fp32, "linear")
    x = np.random.default_rng(3).standard_normal((40, 3, 64, 64), dtype=np.float32)
    x[0] *= 6.0  # the extreme image sits in the first stride (of 2)
    cache = tmp_path / "ranges.json"
    quantize_model(fp32, placement.node_names, "max", reader=TensorDataReader(x), cache_path=cache)
    first = next(n for n in fp32.graph.node if n.name == placement.node_names[0])
    tensor = first.input[0]  # the LayerNorm output feeding attention1.kqv
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    want = max(float(np.abs(sess.run([tensor], {"input": x[i:i + 1]})[0]).max()) for i in range(len(x)))
    got = json.loads(cache.read_text())["data"][tensor]
    assert max(got["highest"]["data"]) == pytest.approx(want, rel=1e-5)
    assert min(got["lowest"]["data"]) == pytest.approx(-want, rel=1e-5)


def test_warnings_survive_a_quantization(fp32, caplog):
    """Quantizing silences ONNX Runtime's own sub-ERROR records (it logs them on the root logger) for the
    call only: afterwards the root level is what it was, and a warning from anywhere reaches the handlers."""
    import logging

    import onnxruntime

    from calibration.quantize import quiet_onnxruntime

    root = logging.getLogger()
    level, filters = root.level, list(root.filters)
    placement = Placement.from_model(fp32, "linear")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    quantize_model(fp32, placement.node_names, "max", reader=TensorDataReader(x))
    assert root.level == level and root.filters == filters
    logging.getLogger("calibration.after").warning("a warning logged after a quantization")
    assert [r.getMessage() for r in caplog.records if r.name == "calibration.after"] == \
        ["a warning logged after a quantization"]
    # Inside the block: a root-logger record from ONNX Runtime's source is dropped, one from elsewhere is not.
    ort_file = str(Path(onnxruntime.__file__).parent / "quantization" / "quantize.py")
    caplog.clear()
    with quiet_onnxruntime():
        for path, msg in ((ort_file, "ort nag"), (__file__, "ours")):
            root.handle(logging.makeLogRecord({"name": "root", "levelno": logging.WARNING, "levelname": "WARNING",
                                               "pathname": path, "msg": msg}))
        logging.getLogger("onnxruntime.transformers").warning("ort named")
    assert [r.getMessage() for r in caplog.records] == ["ours"]
    root.handle(logging.makeLogRecord({"name": "root", "levelno": logging.WARNING, "levelname": "WARNING",
                                       "pathname": ort_file, "msg": "ort nag"}))
    assert [r.getMessage() for r in caplog.records] == ["ours", "ort nag"]  # restored after the block


def test_build_qdq_checks_and_labels_every_target(fp32, fp16, tmp_path):
    """The one int8 step: each target's graph is checked and says what it is; a graph that fails the Q/DQ
    check is not written."""
    from calibration.quantize import build_qdq

    placement = Placement.from_model(fp32, "linear-attn")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    cache = tmp_path / "ranges.json"
    trt = build_qdq(fp32, placement, "max", TensorDataReader(x), tmp_path / "a.int8.onnx", cache=cache,
                     meta={"calib_policy": "linear-attn"}, fp16_model=fp16)
    cpu = build_qdq(fp32, placement, "max", None, tmp_path / "a.int8-cpu.onnx", target="cpu", cache=cache)
    assert not trt["ranges_reused"] and cpu["ranges_reused"]  # the second target reads the first one's ranges
    for info, precision, float_dtype in ((trt, "int8", "float16"), (cpu, "int8-cpu", "float32")):
        meta = read_metadata(info["path"])
        assert (meta["precision"], meta["target"], meta["float_dtype"]) == (precision, info["target"], float_dtype)
        assert meta["calib_method"] == "max" and meta["quantized_nodes"] == str(len(placement.node_names))
        assert meta["model"] == "t2t_vit_test"  # the fp32 graph's metadata is kept
        assert info["qdq_check"]["quantized_nodes"] == len(placement.node_names)
    assert read_metadata(trt["path"])["calib_policy"] == "linear-attn"
    # A LayerNorm among the "policy" nodes: it reads no DQ output, so the check fails and nothing is written.
    ln = next(n.name for n in fp32.graph.node if n.op_type == "LayerNormalization")
    with pytest.raises(QuantizationError, match="does not come from DequantizeLinear"):
        build_qdq(fp32, [*placement.node_names, ln], "max", None, tmp_path / "bad.onnx", target="cpu", cache=cache)
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(QuantizationError, match="unknown target"):
        build_qdq(fp32, placement, "max", None, tmp_path / "bad.onnx", target="gpu", cache=cache)


def _with_recipe(model: onnx.ModelProto, recipe: ExportSettings | None) -> onnx.ModelProto:
    """A copy of ``model`` whose metadata records ``recipe`` (None: no recipe, as an older export wrote it)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    meta = {p.key: p.value for p in out.metadata_props if p.key != METADATA_KEY}
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, {**meta, **(recipe.to_metadata() if recipe else {})})
    return out


def test_build_qdq_follows_the_export_recipe(exported, fp32, fp16, tmp_path):
    """The TensorRT int8 graph is the export's own fp16 graph with Q/DQ: its LayerNorm precision and fp32 island
    are the recipe both graphs record (read back, checked to agree), the island op for op the fp16 export's;
    an fp16 graph from another export, or none, is refused."""
    recipe = ExportSettings.from_metadata(read_metadata(exported / "t2t_vit_test.fp32.onnx"))
    assert recipe.layernorm == "fp16" and recipe.fp32_core
    placement = Placement.from_model(fp32, "linear-attn")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    cache = tmp_path / "ranges.json"
    info = build_qdq(fp32, placement, "max", TensorDataReader(x), tmp_path / "a.onnx", fp16_model=fp16, cache=cache)
    meta = read_metadata(info["path"])
    assert ExportSettings.from_metadata(meta) == recipe and meta["layernorm_precision"] == "fp16"
    graph = onnx.load(info["path"])
    core = set(performer_core_nodes(graph))
    assert info["qdq_check"]["fp32_island_nodes"] == len(core) > 0 and meta["fp32_islands"] == "performer_core_fp32"
    island = collections.Counter(n.op_type for n in fp16.graph.node if n.name in set(performer_core_nodes(fp16)))
    assert collections.Counter(n.op_type for n in graph.graph.node if n.name in core) == island
    # every node of the export's fp16 graph is in the int8 graph, unchanged but for the policy layers' inputs
    kept = {n.name: (n.op_type, list(n.output)) for n in graph.graph.node}
    assert all(kept.get(n.name) == (n.op_type, list(n.output)) for n in fp16.graph.node)
    other = _with_recipe(fp16, recipe.replace(layernorm="fp32"))
    with pytest.raises(QuantizationError, match="not from the export that wrote the fp32 graph.*`make onnx`"):
        build_qdq(fp32, placement, "max", None, tmp_path / "b.onnx", fp16_model=other, cache=cache)
    with pytest.raises(QuantizationError, match="pass fp16_model"):
        build_qdq(fp32, placement, "max", None, tmp_path / "b.onnx", cache=cache)
    assert not (tmp_path / "b.onnx").exists()


def test_build_qdq_refuses_a_graph_without_recipe(exported, fp32, tmp_path):
    """An fp32 graph from before the recipe was recorded: the TensorRT target refuses it in one line naming
    `make onnx`, before calibrating, and writes nothing; the all-fp32 CPU target needs no recipe."""
    old = _with_recipe(fp32, None)
    placement = Placement.from_model(old, "linear-attn")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    with pytest.raises(ExportError, match=r"fp32 graph has no 'export_settings' metadata.*`make onnx`") as e:
        build_qdq(old, placement, "max", TensorDataReader(x), tmp_path / "a.onnx", cache=tmp_path / "r.json",
                   fp16_model=onnx.load(str(exported / "t2t_vit_test.fp16.onnx")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "r.json").exists()  # refused before calibrating
    cpu = build_qdq(old, placement, "max", TensorDataReader(x), tmp_path / "a.int8-cpu.onnx", target="cpu")
    assert read_metadata(cpu["path"])["precision"] == "int8-cpu"


def test_calib_refuses_an_old_export_with_exit_2(exported, tmp_path, capsys):
    """make calib on an fp32 graph without the recipe: exit 2, one line on stderr naming `make onnx`, no int8
    graph written."""
    from calibration.calib import main

    out = tmp_path / "out"
    out.mkdir()
    onnx.save(_with_recipe(onnx.load(str(exported / "t2t_vit_test.fp32.onnx")), None), out / "t2t_vit_test.fp32.onnx")
    train = _make_folder(tmp_path / "train", per_class=1, seed=1)
    rc = main(["--model", "t2t_vit_test", "--out", str(out), "--calib-data", str(train), "--calib-size", "2",
               "--method", "max", "--workers", "0", "--no-progress", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("calibration.calib: error: ") and "has no 'export_settings' metadata" in err[0] and \
        "`make onnx`" in err[0]
    assert not (out / "t2t_vit_test.int8.onnx").exists()


def test_calib_layernorm_flag_only_restates_the_export(exported, tmp_path, capsys):
    """The int8 graph keeps the export's LayerNorms: --layernorm-precision with another value is exit 2 with the
    make onnx that gives it, before any image is decoded; the CPU target ignores it with a warning."""
    from calibration.calib import main

    out = tmp_path / "out"
    out.mkdir()
    for p in ("fp32", "fp16"):
        shutil.copy(exported / f"t2t_vit_test.{p}.onnx", out)  # recipe: fp16 LayerNorms
    train = _make_folder(tmp_path / "train", per_class=1, seed=1)
    argv = ["--model", "t2t_vit_test", "--out", str(out), "--calib-data", str(train), "--calib-size", "2",
            "--method", "max", "--workers", "0", "--no-progress", "--no-eval", "--layernorm-precision", "fp32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export's LayerNorms (fp16)" in err[0] and "--layernorm-precision fp32" in err[0], err
    assert "make onnx" in err[0] and not (out / "calib-cache").exists()


def test_cpu_target_is_the_qdq_graph_onnxruntime_fuses(calib_run, tmp_path, capsys):
    """TARGET=cpu: the same placement over fp32 (no fp16, no island), written as <model>.int8-cpu.onnx, and
    ONNX Runtime's CPU provider turns every quantized MatMul into an integer kernel."""

    import onnxruntime as ort

    from calibration.calib import main

    _, argv, out, _ = calib_run
    argv = [a for a in argv if a not in ("--sensitivity", "family", "max,entropy")]
    argv[argv.index("--method") + 1:argv.index("--method") + 1] = ["max"]
    assert main(argv + ["--target", "cpu"]) == 0
    assert "stay fp32" in capsys.readouterr().out  # the nodes left out of int8 compute in fp32 on this target
    path = out / "t2t_vit_test.int8-cpu.onnx"
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8-cpu" and meta["target"] == "cpu" and meta["fp32_islands"] == "none"
    assert not any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert meta["float_dtype"] == "float32"
    report = json.loads((out / "t2t_vit_test.calib-cpu.json").read_text())
    assert report["target"] == "cpu" and report["primary"]["target"] == "cpu" and report["primary"]["graph"] == str(path)
    md = (out / "t2t_vit_test.calib-cpu.md").read_text()
    # All fp32: the report names no fp32 island (and no Casts), unlike the TensorRT graph's report.
    assert "CPU target" in md and report["fp32_island"]["pattern"] == "none" and "stays float32" not in md
    # The TensorRT run's graph and report (same OUT) are left as they were.
    assert json.loads((out / "t2t_vit_test.calib.json").read_text())["primary"]["target"] == "tensorrt"
    assert read_metadata(out / "t2t_vit_test.int8.onnx")["precision"] == "int8"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    quantized = int(meta["quantized_nodes"])
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops.get("DynamicQuantizeMatMul", 0) >= quantized - 1
    assert ops["MatMul"] < sum(n.op_type == "MatMul" for n in model.graph.node)


def test_bench_calib_redoes_graphs_cached_from_other_weights(tmp_path):
    """bench-calib keeps its graphs in --work between runs; graphs without its weights stamp (a run before
    trained-like biases, whose zero bias Adds were simplified away) are exported and quantized again."""
    from studies import bench_calib as bench

    paths = bench.build_graphs("t2t_vit_test", 32, tmp_path, None, 4)
    stamp = paths["fp32"].parent / "weights.txt"
    assert stamp.read_text() == bench.WEIGHTS
    kept = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert {k: p.stat().st_mtime_ns for k, p in bench.build_graphs("t2t_vit_test", 32, tmp_path, None, 4).items()} == kept
    stamp.unlink()
    paths["fp32"].write_bytes(b"an old graph")
    again = bench.build_graphs("t2t_vit_test", 32, tmp_path, None, 4)
    assert stamp.read_text() == bench.WEIGHTS
    assert onnx.load(str(again["fp32"])).graph.node  # exported again
    assert all(again[k].stat().st_mtime_ns > kept[k] for k in ("fp16", "int8", "int8-fp32"))
    # The benchmarked int8 graphs are make calib's (build_qdq's metadata names the target): one written by
    # anything else, or from other calibration images, is built again.
    assert read_metadata(again["int8"])["target"] == "tensorrt" and read_metadata(again["int8-fp32"])["target"] == "cpu"
    kept = {k: p.stat().st_mtime_ns for k, p in again.items()}
    plain = onnx.load(str(again["int8-fp32"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(again["int8-fp32"]))
    redone = bench.build_graphs("t2t_vit_test", 32, tmp_path, None, 4)
    assert read_metadata(redone["int8-fp32"])["target"] == "cpu" and redone["int8"].stat().st_mtime_ns > kept["int8"]
    assert redone["fp32"].stat().st_mtime_ns == kept["fp32"]
    kept = {k: p.stat().st_mtime_ns for k, p in redone.items()}
    other = bench.build_graphs("t2t_vit_test", 32, tmp_path, None, 2)
    assert read_metadata(other["int8"])["calib_size"] == "2" and other["int8"].stat().st_mtime_ns > kept["int8"]
