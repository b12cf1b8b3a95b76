"""The FP8 (E4M3) graph: its Q/DQ structure, scales checked against independent amax computations, the
attention pattern TensorRT's FP8 MHA fusion needs, ONNX Runtime's emulation semantics, and the command.

Everything runs on t2t_vit_test (64 px) with random weights and synthetic images (no ../shared/data).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import t2t_vit  # noqa: F401  (registers the models)
from calibration.mha_pattern import mha_patterns
from calibration.policy import DEFAULT_POLICY, Placement
from calibration.quantize import QuantizationError, TensorDataReader, build_qdq, check_qdq, ensure_opset
from export.settings import ExportSettings
from t2t_vit.graphs import GraphError, describe_graph, expect_graph, read_metadata

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n02102040", "n02979186"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The export (fp32, fp16) and the int8 and fp8 TensorRT graphs built from the same ranges."""
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model, trained_like_

    out = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    model = build_model("t2t_vit_test").eval()
    trained_like_(model)
    export_model(model, out, ExportSettings())
    fp32 = ensure_opset(onnx.load(str(out / "t2t_vit_test.fp32.onnx")))
    fp16 = onnx.load(str(out / "t2t_vit_test.fp16.onnx"))
    placement = Placement.from_model(fp32, DEFAULT_POLICY)
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    info = {}
    for qtype in ("int8", "fp8"):
        info[qtype] = build_qdq(fp32, placement, "max", TensorDataReader(x), out / f"t2t_vit_test.{qtype}.onnx",
                                fp16_model=fp16, cache=out / "ranges.json", qtype=qtype)
    return {"out": out, "fp16": fp16, "x": x, "info": info,
            "int8": onnx.load(str(out / "t2t_vit_test.int8.onnx")), "fp8": onnx.load(str(out / "t2t_vit_test.fp8.onnx"))}


def _inits(model):
    return {i.name: i for i in model.graph.initializer}


def _arr(t):
    return numpy_helper.to_array(t).astype(np.float32)


def test_every_quantizer_is_float8e4m3fn_with_zero_zero_points(graphs):
    g = graphs["fp8"]
    inits = _inits(g)
    qdq = [n for n in g.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == len([n for n in graphs["int8"].graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")])
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and not _arr(zp).any(), n.name
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN
    assert not any(i.data_type == TensorProto.INT8 for i in g.graph.initializer)
    meta = read_metadata(graphs["out"] / "t2t_vit_test.fp8.onnx")
    assert meta["precision"] == "fp8" == describe_graph(g)["precision"] and meta["qdq_dtype"] == "float8e4m3fn"
    assert meta["requires_compute_capability"] == "8.9" and meta["opset"] == "19"
    onnx.checker.check_model(g, full_check=True)


def test_weight_scales_are_per_channel_amax_over_448(graphs):
    """Independent: each weight's per-output-channel amax from the fp16 export's own float weight."""
    g, fp16 = graphs["fp8"], graphs["fp16"]
    inits, w16 = _inits(g), _inits(fp16)
    by_name16 = {n.name: n for n in fp16.graph.node}
    readers = {i: n for n in g.graph.node for i in n.input}
    checked = 0
    for dq in (n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits):
        layer = readers[dq.output[0]]
        idx = list(layer.input).index(dq.output[0])
        w = _arr(w16[by_name16[layer.name].input[idx]])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1)
        scale = _arr(inits[dq.input[1]])
        np.testing.assert_allclose(scale, amax / 448, rtol=1e-3)  # fp16 scales: 11-bit significand
        q = np.moveaxis(_arr(inits[dq.input[0]]), axis, 0).reshape(w.shape[axis], -1)
        # the channel's largest weight lands on (or, by the fp16 scale's rounding, next to) 448
        np.testing.assert_allclose(np.abs(q).max(1), 448, rtol=2 ** -3)
        # E4M3 rounding: within half an ulp (2^-4 relative) or half the smallest subnormal step
        deq = np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis) * \
            scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        step = scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)]) * 2.0 ** -10
        assert np.all(np.abs(deq - w) <= 2.0 ** -4 * np.abs(w) * (1 + 1e-3) + step)
        checked += 1
    assert checked == graphs["info"]["fp8"]["qdq_check"]["weight_dq"] > 10


def test_activation_scales_are_the_int8_ranges_rescaled(graphs):
    """The int8 graph (ONNX Runtime's own quantizer) stores amax/127 per tensor; fp8 must store amax/448 for the
    same tensors."""
    s8 = {n.input[0]: _arr(_inits(graphs["int8"])[n.input[1]]) for n in graphs["int8"].graph.node
          if n.op_type == "QuantizeLinear"}
    s_fp8 = {n.input[0]: _arr(_inits(graphs["fp8"])[n.input[1]]) for n in graphs["fp8"].graph.node
             if n.op_type == "QuantizeLinear"}
    assert set(s8) == set(s_fp8) and len(s8) > 10
    for t in s8:
        np.testing.assert_allclose(s_fp8[t], s8[t] * 127 / 448, rtol=2e-3, err_msg=t)


def test_every_backbone_attention_has_the_fusable_fp8_pattern(graphs):
    pats = mha_patterns(graphs["fp8"])
    blocks = len(t2t_vit.checkpoint.build_model("t2t_vit_test").blocks)
    assert len(pats) == blocks
    for p in pats:
        assert p.fp8_fusable and p.dq_direct and p.scale == "q", p.problems
        assert (p.q, p.k, p.v, p.softmax_out) == ("float8e4m3fn",) * 4
    # the int8 graph has the same placement, with int8 types: not the FP8 pattern
    assert all(p.qdq_placed and not p.fp8_fusable for p in mha_patterns(graphs["int8"]))


def test_check_qdq_holds_the_fp8_graph_to_fp8(graphs):
    names = [n.name for n in graphs["fp8"].graph.node if n.op_type in ("MatMul", "Gemm")
             and any(i.endswith("DequantizeLinear_Output") or "DequantizeLinear" in i for i in n.input)]
    nodes = graphs["info"]["fp8"]["qdq_check"]["quantized_nodes"]
    with pytest.raises(QuantizationError, match="want FLOAT8E4M3FN"):
        check_qdq(graphs["int8"], names[:nodes], qtype="fp8")
    with pytest.raises(QuantizationError, match="want INT8"):
        check_qdq(graphs["fp8"], names[:nodes], qtype="int8")


def test_onnxruntime_emulates_tensorrt_fp8_quantize():
    """ONNX Runtime's QuantizeLinear/DequantizeLinear to float8e4m3fn (fp16 input and scale, opset 19) is
    TensorRT's castToFp8(clip(x / s, -448, 448)) with round-to-nearest-even: checked against ml_dtypes."""
    import onnxruntime as ort

    scale = np.float16(0.05)
    x = np.concatenate([np.linspace(-30, 30, 4001), [1e4, -1e4, 0.0]]).astype(np.float16)
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [x.size])],
        [numpy_helper.from_array(np.array(scale), "s"), zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = np.clip(x.astype(np.float32) / np.float32(scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(y, (ref.astype(np.float32) * np.float32(scale)).astype(np.float16))
    assert y.max() == np.float16(448 * np.float32(scale))  # saturated, not NaN


def test_fp8_graph_runs_close_to_fp32(graphs):
    import onnxruntime as ort

    def run(name):
        s = ort.InferenceSession(str(graphs["out"] / f"t2t_vit_test.{name}.onnx"), providers=["CPUExecutionProvider"])
        return s.run(None, {"input": graphs["x"]})[0].astype(np.float32)

    ref, y8, yf8 = run("fp32"), run("int8"), run("fp8")
    scale = np.abs(ref).max()
    assert 0 < np.abs(yf8 - ref).max() < 0.1 * scale  # quantized (not a copy), and not broken
    assert np.abs(y8 - ref).max() < 0.1 * scale


def test_an_fp8_graph_is_refused_where_int8_is_expected(graphs, tmp_path):
    wrong = tmp_path / "t2t_vit_test.int8.onnx"
    shutil.copy(graphs["out"] / "t2t_vit_test.fp8.onnx", wrong)
    with pytest.raises(GraphError, match="fp8"):
        expect_graph(wrong, model="t2t_vit_test", precision="int8")


def _folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in WNIDS:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_make_calib_precision_fp8_writes_graph_and_report(graphs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for p in ("fp32", "fp16"):
        shutil.copy(graphs["out"] / f"t2t_vit_test.{p}.onnx", out)
    train, val = _folder(tmp_path / "train", 2, 1), _folder(tmp_path / "val", 1, 2)
    cmd = ["make", "--no-print-directory", "calib", "MODEL=t2t_vit_test", f"OUT={out}", f"CALIB_DATA={train}",
           "CALIB_SIZE=6", "CALIB_METHOD=max", "PRECISION=fp8",
           f"ARGS=--val-data {val} --workers 0 --no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert read_metadata(out / "t2t_vit_test.fp8.onnx")["precision"] == "fp8"
    assert not (out / "t2t_vit_test.int8.onnx").exists()
    report = json.loads((out / "t2t_vit_test.calib-fp8.json").read_text())
    assert report["qtype"] == "fp8" and report["precision"] == "fp8" and "fp8-max" in report["accuracy"]
    assert report["attention"]["fp8_fusable"] == report["attention"]["attentions"] > 0
    assert (out / "t2t_vit_test.calib-fp8.md").read_text().startswith("# FP8 calibration")

    # fp8 for the CPU target: one line, exit 2, nothing written
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run([sys.executable, "-m", "calibration.calib", "--model", "t2t_vit_test", "--out", str(out),
                        "--calib-data", str(train), "--calib-size", "6", "--precision", "fp8", "--target", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "onnxruntime-cpu-fp8" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_percentile_on_too_few_images_is_refused(graphs, tmp_path):
    """99.99th percentile of a tensor with fewer than 10,000 values is its maximum: one line, exit 2, nothing
    written; the count comes from the head input's size (t2t_vit_test: one 64-wide token per image)."""
    out = tmp_path / "out"
    out.mkdir()
    for p in ("fp32", "fp16"):
        shutil.copy(graphs["out"] / f"t2t_vit_test.{p}.onnx", out)
    train = _folder(tmp_path / "train", 2, 1)
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run([sys.executable, "-m", "calibration.calib", "--model", "t2t_vit_test", "--out", str(out),
                        "--calib-data", str(train), "--calib-size", "6", "--method", "max,percentile",
                        "--precision", "fp8", "--no-eval"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    embed = t2t_vit.checkpoint.build_model("t2t_vit_test").embed_dim
    assert f"{embed} values per image" in r.stderr and f"{-(-10000 // embed)} images" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
