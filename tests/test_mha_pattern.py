"""The FP8 MHA pattern checker (calibration.mha_pattern), the ModelOpt side-by-side report builder on small
fake inputs, and `make modelopt-compare`'s one line when ModelOpt's virtualenv is missing.

The attention graphs are built by hand with onnx.helper, in the shape the T2T-ViT export has
(``Q*scale -> MatMul(Q, Transpose(K)) -> Softmax -> MatMul(P, V)``), with and without the Q/DQ pairs, so each
check is against a structure the test itself states."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.compare_modelopt import (CompareError, build_report, check_modelopt_python, qdq_counts,
                                          render_markdown)
from calibration.mha_pattern import FP8, mha_patterns, summarize_patterns
from t2t_vit.checkpoint import build_model
from t2t_vit.files import file_sha256
from tests.image_helpers import noise_images

REPO = Path(__file__).resolve().parents[1]
B, H, S, D = 1, 2, 5, 8  # batch, heads, tokens, head size


class _Graph:
    """A tiny attention graph under construction: nodes and initializers with unique names."""

    def __init__(self, qdq_type: int | None):
        self.nodes, self.inits, self.n = [], [], 0
        self.qdq_type = qdq_type

    def const(self, value, dtype=np.float32) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self.n}", **attrs))
        return out

    def qdq(self, x: str) -> str:
        """Q -> DQ of ``x`` with a scalar scale and an all-zero zero point of the graph's Q/DQ type."""
        if self.qdq_type is None:
            return x
        scale = self.const(0.05)
        self.n += 1
        zp = f"zp{self.n}"
        self.inits.append(helper.make_tensor(zp, self.qdq_type, [], [0]))
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, scale, zp]), scale, zp])


def attention_model(qdq_type: int | None = TensorProto.FLOAT8E4M3FN, scale_on: str = "q",
                    skip: tuple[str, ...] = (), transpose_after_dq: bool = True) -> onnx.ModelProto:
    """softmax((Q*s) K^T) V over inputs q, k, v of shape (B, H, S, D), Q/DQ on the operands not in ``skip``.

    Args:
        qdq_type: element type of every Q/DQ (None: no Q/DQ at all).
        scale_on: ``q`` (Mul on Q before BMM1) or ``scores`` (Mul on the BMM1 output).
        skip: operands left unquantized: any of ``q``, ``k``, ``v``, ``p``.
        transpose_after_dq: K's Transpose between its DQ and BMM1 (TensorRT moves DQ across it) or before its Q.
    """
    g = _Graph(qdq_type)
    q = "q"
    if scale_on == "q":
        q = g.op("Mul", [q, g.const(D ** -0.5)])
    q = q if "q" in skip else g.qdq(q)
    if transpose_after_dq:
        k = g.op("Transpose", ["k" if "k" in skip else g.qdq("k")], perm=[0, 1, 3, 2])
    else:
        k = g.op("Transpose", ["k"], perm=[0, 1, 3, 2])
        k = k if "k" in skip else g.qdq(k)
    scores = g.op("MatMul", [q, k])
    if scale_on == "scores":
        scores = g.op("Mul", [scores, g.const(D ** -0.5)])
    p = g.op("Softmax", [scores], axis=-1)
    p = p if "p" in skip else g.qdq(p)
    out = g.op("MatMul", [p, "v" if "v" in skip else g.qdq("v")])
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, S, D]) for n in ("q", "k", "v")]
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [B, H, S, D])]
    graph = helper.make_graph(g.nodes, "attn", ins, outs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_fp8_pattern_is_fusable_and_checker_agrees_with_onnx():
    model = attention_model()
    onnx.checker.check_model(model, full_check=True)
    (p,) = mha_patterns(model)
    assert p.bmm1 and p.bmm2 and p.scale == "q" and p.head_size == D
    assert (p.q, p.k, p.v, p.softmax_out) == (FP8,) * 4
    assert p.qdq_placed and p.fp8_fusable and p.problems == ()
    assert not p.dq_direct  # K's DQ reaches BMM1 through its Transpose


def test_fp8_pattern_with_transpose_before_the_quantizer():
    (p,) = mha_patterns(attention_model(transpose_after_dq=False))
    assert p.fp8_fusable and p.dq_direct, p.problems


@pytest.mark.parametrize("missing, what", [("q", "Q"), ("k", "K"), ("v", "V"), ("p", "softmax output")])
def test_each_missing_quantizer_is_named(missing, what):
    (p,) = mha_patterns(attention_model(skip=(missing,)))
    assert not p.fp8_fusable and not p.qdq_placed
    assert p.problems == (f"{what} is not quantized",)


def test_scale_on_the_scores_is_not_fusable():
    (p,) = mha_patterns(attention_model(scale_on="scores"))
    assert p.scale == "scores" and not p.qdq_placed and not p.fp8_fusable
    assert any("BMM1" in msg for msg in p.problems)


def test_int8_qdq_is_placed_but_not_fp8():
    (p,) = mha_patterns(attention_model(qdq_type=TensorProto.INT8))
    assert p.qdq_placed and not p.fp8_fusable
    assert set(p.problems) == {f"{w} Q/DQ is int8, not {FP8}" for w in ("Q", "K", "V", "softmax output")}


def test_unquantized_graph_and_summary():
    ps = mha_patterns(attention_model(qdq_type=None)) + mha_patterns(attention_model())
    s = summarize_patterns(ps)
    assert (s["softmax"], s["attentions"], s["qdq_placed"], s["fp8_fusable"]) == (2, 2, 1, 1)
    assert s["problems"]["Q is not quantized"] == 1 and s["scale"] == ["q"] and s["head_sizes"] == [D]


def test_a_softmax_without_matmuls_is_not_an_attention():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm")], "g", [x], [y]))
    (p,) = mha_patterns(model)
    assert p.bmm1 is None and "not an attention" in p.problems[0]
    assert summarize_patterns([p])["attentions"] == 0


def test_qdq_counts_by_consumer_and_type():
    c = qdq_counts(attention_model())
    # Q, K, V, P: four activation pairs, all fp8; the DQs feed MatMul (Q, P, V) and Transpose (K)
    assert (c["quantize"], c["dequantize"], c["weight_dq"]) == (4, 4, 0)
    assert c["q_types"] == {FP8: 4} and c["dq_types"] == {FP8: 4}
    assert c["dq_feeds"] == {"MatMul": 3, "Transpose": 1}


def _fake_graph(status: str, mode: str, source: str, fusable: int = 0) -> dict:
    g = {"source": source, "mode": mode, "status": status, "path": f"/x/{source}-{mode}.onnx"}
    if status == "ok":
        g["summary"] = {"qdq": {"quantize": 3, "dequantize": 5, "q_types": {mode: 3}, "dq_feeds": {"MatMul": 5}},
                        "attention": {"attentions": 7, "qdq_placed": 7, "fp8_fusable": fusable, "dq_direct": 7,
                                      "scale": ["q"]}}
    return g


def test_report_builder_on_fake_inputs():
    header = {"tool": "calibration.compare_modelopt", "command": "python -m calibration.compare_modelopt x",
              "created_utc": "2026-12-04T00:00:00+00:00", "host": {"cpu": "test", "cpu_cores_usable": 1}}
    setup = {"model": "t2t_vit_7", "img_size": "64", "fp32_onnx": "/x/m.fp32.onnx", "threads": 1,
             "calibration": {"data": "/d/train", "size": 8, "seed": 0},
             "modelopt": {"python": "/v/bin/python", "version": "0.47.0", "versions": "onnx 1.21.0"}}
    graphs = {"fp32": _fake_graph("ok", "fp32", "export"), "ours-int8": _fake_graph("ok", "int8", "ours"),
              "ours-fp8": {"source": "ours", "mode": "fp8", "status": "not built yet", "note": "m.fp8.onnx not found"},
              "modelopt-int8": {"source": "modelopt", "mode": "int8", "status": "failed",
                                "error": {"type": "ValueError", "message": "boom at node X", "traceback": ["..."]}},
              "modelopt-fp8": _fake_graph("ok", "fp8", "modelopt", fusable=7)}
    acc = {"fp32": {"top1": 80.0}, "ours-int8": {"top1": 79.5, "top1_agreement": 99.0, "max_abs_dlogit": 0.3},
           "modelopt-fp8": {"top1": 78.0, "top1_agreement": 97.0, "max_abs_dlogit": 0.9}}
    r = build_report(header, setup, graphs, acc, {"data": "/d/val", "images": 20, "skipped": 0})
    assert r["graphs"]["ours-int8"]["accuracy"]["top1_drop"] == pytest.approx(0.5)
    assert r["graphs"]["modelopt-fp8"]["accuracy"]["top1_drop"] == pytest.approx(2.0)
    assert "accuracy" not in r["graphs"]["ours-fp8"] and r["modelopt_errors"] == {
        "modelopt-int8": graphs["modelopt-int8"]["error"]}
    md = render_markdown(r)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| graph")}
    assert rows["ours-fp8"][0] == "not built yet" and rows["ours-fp8"][1] == "-"
    assert rows["modelopt-int8"][0] == "failed: ValueError"
    assert rows["modelopt-fp8"][1:4] == ["78.00", "2.00", "97.00"]
    assert rows["modelopt-fp8"][-4:] == ["7/7", "7/7", "7/7", "q"]  # placed, direct, fusable, scale
    assert "`ValueError: boom at node X`" in md


def test_missing_modelopt_python_is_one_clear_error(tmp_path):
    with pytest.raises(CompareError, match="make modelopt-venv"):
        check_modelopt_python(tmp_path / "nope" / "bin" / "python")


def test_make_modelopt_compare_without_the_venv_says_why_in_one_line(tmp_path):
    """The target itself: exit 2, one line naming the missing interpreter and the command that makes it, nothing
    written (it fails before the fp32 graph or any image is touched)."""
    out = tmp_path / "out"
    proc = subprocess.run(["make", "-s", "modelopt-compare", f"MODELOPT_VENV={tmp_path / 'no-venv'}",
                           "MODEL=t2t_vit_test", f"OUT={out}", f"CALIB_DATA={tmp_path}",
                           f"ARGS=--report {tmp_path / 'rep'}", f"PYTHON={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("make")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("calibration.compare_modelopt: error: ModelOpt's virtualenv is missing")
    assert "make modelopt-venv" in lines[0] and str(tmp_path / "no-venv") in lines[0]
    assert not out.exists() and not (tmp_path / "rep.json").exists()


@pytest.mark.slow
def test_a_modelopt_failure_is_recorded_in_the_report(tmp_path):
    """ModelOpt 'installed' where it cannot import (this project's interpreter has no modelopt): every graph
    of ours is still evaluated, our fp8 graph (make calib PRECISION=fp8 on the same images) with its Q/DQ counts
    and attention check, the report records the runner's exact error, the command exits 2 in one line, and the
    fp32 graph is left as it was."""
    data = tmp_path / "data"
    noise_images(data / "train", size=40), noise_images(data / "val", size=40)
    out, rep = tmp_path / "out", tmp_path / "rep" / "modelopt-t2t_vit_test"
    ex = subprocess.run([sys.executable, "-m", "export.to_onnx", "--model", "t2t_vit_test", "--out", str(out),
                         "--val-images", "0"], cwd=REPO, capture_output=True, text=True, timeout=500)
    assert ex.returncode == 0, ex.stderr  # the comparison quantizes what make onnx wrote
    cal = subprocess.run([sys.executable, "-m", "calibration.calib", "--model", "t2t_vit_test", "--out", str(out),
                          "--calib-data", str(data / "train"), "--calib-size", "4", "--method", "max", "--precision",
                          "fp8", "--no-eval", "--workers", "0", "--no-progress", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=500)
    assert cal.returncode == 0, cal.stderr[-2000:]  # our fp8 graph, calibrated on the images the comparison uses
    cmd = [sys.executable, "-m", "calibration.compare_modelopt", "--model", "t2t_vit_test", "--out", str(out),
           "--calib-data", str(data / "train"), "--calib-size", "4", "--modes", "fp8", "--threads", "1",
           "--workers", "0", "--no-progress", "--modelopt-python", sys.executable, "--report", str(rep)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "ModelOpt could not quantize (modelopt-fp8): ModuleNotFoundError" in err[0], proc.stderr
    r = json.loads(rep.with_suffix(".json").read_text())
    e = r["modelopt_errors"]["modelopt-fp8"]
    assert e["type"] == "ModuleNotFoundError" and "modelopt" in e["message"]
    assert r["graphs"]["modelopt-fp8"]["status"] == "failed" and r["graphs"]["ours-int8"]["status"] == "not built yet"
    ours = r["graphs"]["ours-fp8"]
    assert ours["status"] == "ok" and ours["path"] == str(out / "t2t_vit_test.fp8.onnx")
    assert ours["same_calibration_images"] and ours["calib_method"] == "max" and ours["note"] == ""
    q = ours["summary"]["qdq"]
    assert set(q["q_types"]) == {FP8} and set(q["dq_types"]) == {FP8} and q["weight_dq"] > 0
    att = ours["summary"]["attention"]
    blocks = len(build_model("t2t_vit_test").blocks)
    assert att["attentions"] == att["fp8_fusable"] == att["dq_direct"] == blocks
    assert ours["accuracy"]["max_abs_dlogit"] > 0 and 0 <= ours["accuracy"]["top1_agreement"] <= 100
    row = next(ln for ln in rep.with_suffix(".md").read_text().splitlines() if ln.startswith("| ours-fp8 |"))
    assert row.split("|")[2].strip() == "ok" and f"{blocks}/{blocks}" in row
    assert r["graphs"]["fp32"]["accuracy"]["top1"] is not None and r["validation"]["images"] == 6
    assert r["calibration"]["size"] == 4 and np.load(r["calibration"]["npy"]).shape == (4, 3, 64, 64)
    assert "ModuleNotFoundError" in rep.with_suffix(".md").read_text()
    assert r["fp32_sha256"] == file_sha256(out / "t2t_vit_test.fp32.onnx")


def test_nonfinite_tensors_names_the_overflowing_exp(tmp_path):
    from calibration.compare_modelopt import nonfinite_tensors

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
             helper.make_node("Exp", ["big"], ["e"], name="exp"),
             helper.make_node("Clip", ["e", "lo", "hi"], ["y"], name="clip")]
    inits = [numpy_helper.from_array(np.array(100.0, np.float32), n) if n == "k" else
             numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("k", 0), ("lo", -1e4), ("hi", 1e4))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    images = np.array([[0.1, 1.0, 2.0], [0.0, 0.5, 0.2]], np.float32)  # exp(100 x) overflows fp32 above x ~ 0.887
    assert nonfinite_tensors(path, images) == [{"tensor": "e", "op": "Exp", "inf": 2, "nan": 0}]
