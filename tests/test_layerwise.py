"""evaluation.layerwise: Polygraphy's ONNX Runtime runner and comparator over every shared tensor, and the
first layer past the tolerance, named on a deliberately broken graph."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from evaluation import layerwise as L
from export.to_onnx import export_model
from t2t_vit.checkpoint import build_model

MODEL = "t2t_vit_test"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """fp32 and fp16 graphs of the tiny model, and a small ImageFolder of varied images."""
    out = tmp_path_factory.mktemp("layers")
    import torch

    torch.manual_seed(0)
    export_model(build_model(MODEL).eval(), out)
    rng = np.random.default_rng(0)
    for c in range(3):
        d = out / "images" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return out


def _break(src: Path, dst: Path, node_scope: str, factor: float) -> str:
    """Scale the weight of the MatMul in ``node_scope`` (a conversion bug in one layer); returns the node name."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and node_scope in n.name
                and any(t in inits for t in n.input))
    w = next(t for t in node.input if t in inits)
    assert users[w] == 1, "the weight must be this layer's own"
    arr = numpy_helper.to_array(inits[w]) * np.asarray(factor, dtype=numpy_helper.to_array(inits[w]).dtype)
    inits[w].CopyFrom(numpy_helper.from_array(arr, w))
    onnx.save(model, str(dst))
    return node.name


def test_names_map_to_modules():
    assert L.tensor_module("/model/blocks.3/attn/qkv/MatMul_output_0") == "blocks.3.attn.qkv"
    assert L.tensor_module("/tokens_to_token/attention1/Exp_output_0") == "tokens_to_token.attention1"
    assert L.tensor_module("logits") == "(graph)"
    assert L.canonical("/model/norm/LayerNormalization_output_0") == "/norm/LayerNormalization_output_0"


def test_fp16_graph_stays_within_tolerance(graphs, capsys):
    rc = L.main(["--model", MODEL, "--out", str(graphs), "--precision", "fp16", "--data", str(graphs / "images"),
                 "--images", "6", "--threads", "1"])
    report = json.loads((graphs / f"layers-{MODEL}-fp16.json").read_text())
    res = report["result"]
    assert rc == 0, capsys.readouterr().err
    assert report["tool"] == "evaluation.layerwise" and report["images"] == 6
    assert res["runners"][:2] == ["onnxruntime-cpu-fp32", "onnxruntime-cpu-fp16"]
    assert res["compared"] > 100  # nearly every tensor of the graph, not just the logits
    modules = {r["module"] for r in res["tensors"]}
    assert {"tokens_to_token.attention1", "blocks.0.attn", "blocks.1.mlp.fc1", "norm"} <= modules
    errs = [r["by_runner"]["onnxruntime-cpu-fp16"]["relative"] for r in res["tensors"]]
    assert 0 < max(errs) < L.DEFAULT_TOLERANCE["fp16"] and res["first_bad"]["onnxruntime-cpu-fp16"] is None
    # Polygraphy's comparator saw the same tensors: its max |diff| equals ours.
    r0 = next(r for r in res["tensors"] if r["by_runner"]["onnxruntime-cpu-fp16"]["max_abs"] > 0)
    m = r0["by_runner"]["onnxruntime-cpu-fp16"]
    assert m["polygraphy_max_absdiff"] == pytest.approx(m["max_abs"], rel=1e-3)
    assert (graphs / f"layers-{MODEL}-fp16.png").read_bytes()[:4] == b"\x89PNG"
    assert "Every tensor is within the tolerance" in (graphs / f"layers-{MODEL}-fp16.md").read_text()


def test_broken_layer_is_named_first(graphs, capsys):
    broken = graphs / "broken.fp16.onnx"
    node = _break(graphs / f"{MODEL}.fp16.onnx", broken, "blocks.1/mlp/fc1", 1.25)
    rc = L.main(["--model", MODEL, "--out", str(graphs), "--precision", "fp16", "--candidate", str(broken),
                 "--data", str(graphs / "images"), "--images", "6", "--threads", "1"])
    assert rc == 1  # a tensor exceeds the tolerance
    out = capsys.readouterr()
    report = json.loads((graphs / f"layers-{MODEL}-fp16.json").read_text())
    first = report["result"]["first_bad"]["onnxruntime-cpu-fp16"]
    assert first["module"] == "blocks.1.mlp.fc1" and node.endswith("MatMul")
    assert first["relative"] > 0.1
    # every tensor before it is still within the tolerance
    before = [r for r in report["result"]["tensors"] if r["depth"] < first["depth"]]
    assert before and all(r["by_runner"]["onnxruntime-cpu-fp16"]["relative"] <= L.DEFAULT_TOLERANCE["fp16"] for r in before)
    assert "blocks.1.mlp.fc1" in out.out and "blocks.1.mlp.fc1" in (graphs / f"layers-{MODEL}-fp16.md").read_text()


def test_missing_graph_says_how_to_make_it(tmp_path, capsys):
    assert L.main(["--model", MODEL, "--out", str(tmp_path), "--precision", "int8"]) == 2
    assert "make onnx" in capsys.readouterr().err


def test_performer_core_is_judged_at_its_output(graphs):
    """Inside a Performer core (random features, their sums, D) errors are reported but only the core's output,
    the tensor proj reads, counts for the first bad layer; --include-core counts them all."""
    fp32 = onnx.load(str(graphs / f"{MODEL}.fp32.onnx"))
    internal = L.core_internal_tensors(fp32)
    exps = [n.output[0] for n in fp32.graph.node if n.op_type == "Exp"]
    assert exps and set(exps) <= internal
    proj_inputs = {t for n in fp32.graph.node if "/proj/" in n.name for t in n.input}
    assert internal and not (proj_inputs & internal)
    # Break the first Performer's feature projection w (read by its k and q feature MatMuls): the core's
    # output diverges, so the layer is still found.
    broken = graphs / "broken-core.fp16.onnx"
    model = onnx.load(str(graphs / f"{MODEL}.fp16.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    feat = next(n for n in model.graph.node if n.op_type == "MatMul" and "/attention1/MatMul" in n.name
                and any(t in inits for t in n.input))
    w = next(t for t in feat.input if t in inits)
    inits[w].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[w]) * np.float32(1.5), w))
    onnx.save(model, str(broken))
    images = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    judged = L.compare_layers(graphs / f"{MODEL}.fp32.onnx", broken, "fp16", images, 1e-2, tensorrt=False)
    every = L.compare_layers(graphs / f"{MODEL}.fp32.onnx", broken, "fp16", images, 1e-2, tensorrt=False,
                             include_core=True)
    first, first_any = judged["first_bad"]["onnxruntime-cpu-fp16"], every["first_bad"]["onnxruntime-cpu-fp16"]
    assert first["module"] == first_any["module"] == "tokens_to_token.attention1"
    assert first_any["tensor"] in internal and first["tensor"] not in internal and first_any["depth"] < first["depth"]
    flagged = {t["tensor"] for t in judged["tensors"] if t["inside_performer_core"]}
    assert flagged and flagged == {t["tensor"] for t in judged["tensors"]} & internal
    assert judged["core_internal"] == len(flagged)


def test_tensorrt_engine_comes_from_the_one_build(graphs, monkeypatch):
    """Where TensorRT exists, the candidate's engine is engines.build's (a profile of 1..batch_size, every tensor an
    output), built from the renamed candidate so TensorRT's outputs carry the names the comparison looks up."""
    from polygraphy.backend import trt as pg_trt

    from engines import build as B

    ref = onnx.load(str(graphs / f"{MODEL}.fp32.onnx"))
    cand = onnx.load(str(graphs / f"{MODEL}.fp16.onnx"))
    pairs = L.shared_tensors(ref, cand)
    assert any(p["tensor"] != p["candidate_tensor"] for p in pairs)  # the fp16 export's /model/ scope
    renamed = L._rename_tensors(cand, {p["candidate_tensor"]: p["tensor"] for p in pairs})
    names = [p["tensor"] for p in pairs]
    seen = {}

    def fake_build(path, shapes, settings, *, mark_all_outputs=False):
        built = onnx.load(str(path))
        seen.update(shapes=shapes, settings=settings, mark_all=mark_all_outputs,
                    tensors={o for n in built.graph.node for o in n.output})
        return B.BuiltEngine(b"ENGINE", "10.13.3.9", {"name": "GPU"}, Path("c"), 0.0, 8, "0")

    monkeypatch.setattr(L.TensorRTRunner, "availability", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(L, "build_serialized_engine", fake_build)
    monkeypatch.setattr(pg_trt, "EngineFromBytes", lambda data: ("engine from", data))
    monkeypatch.setattr(pg_trt, "TrtRunner", lambda engine, name: (name, engine))
    runners, why = L._runners(ref, renamed, names, "fp16", graphs / f"{MODEL}.fp16.onnx", True, batch_size=4)
    assert why == "" and runners[-1] == ("tensorrt-fp16", ("engine from", b"ENGINE"))
    assert seen["mark_all"] is True and set(names) <= seen["tensors"]
    assert seen["shapes"] == {"input": {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [4, 3, 64, 64]}}
    assert (seen["settings"].min_batch, seen["settings"].max_batch, seen["settings"].tf32) == (1, 4, False)


def _synthetic_report() -> dict:
    """A t2t_vit_7-shaped layer report (module order and sizes as the real graph), no graphs needed."""
    layout = ([("tokens_to_token.soft_split0", 3, False)] + [("tokens_to_token.attention1", 60, True)]
              + [("tokens_to_token.soft_split1", 3, False), ("tokens_to_token.attention2", 60, True),
                 ("tokens_to_token.soft_split2", 2, False), ("tokens_to_token.project", 3, False),
                 ("(graph)", 2, False)]
              + [(f"blocks.{i}.mlp", 30, False) for i in range(7)] + [("norm", 1, False), ("head", 1, False)])
    tensors, depth = [], 0
    for module, n, core in layout:
        for k in range(n):
            tensors.append({"tensor": f"/{module}/t{k}", "module": module, "op": "MatMul", "depth": depth,
                            "inside_performer_core": core and k % 2 == 0,
                            "by_runner": {"onnxruntime-cpu-int8": {"relative": 0.01 + 0.001 * (k % 5)}}})
            depth += 1
    return {"model": "t2t_vit_7", "precision": "int8", "images": 16, "tolerance": 0.1,
            "result": {"runners": ["onnxruntime-cpu-fp32", "onnxruntime-cpu-int8"], "tensors": tensors,
                       "first_bad": {"onnxruntime-cpu-int8": None}, "include_core": False}}


def test_plot_marks_performer_core_points_and_keeps_stage_labels_apart():
    report = _synthetic_report()
    fig = L.plot(report)
    fig.canvas.draw()
    ax = fig.axes[0]
    n_core = sum(r["inside_performer_core"] for r in report["result"]["tensors"])
    marked = [c for c in ax.collections if "Performer core" in str(c.get_label())]
    assert len(marked) == 1 and len(marked[0].get_offsets()) == n_core == 60
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == (["T2T attn1", "T2T attn2", "T2T proj"]
                                              + [f"block {i}" for i in range(7)] + ["norm, head"])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlaps = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert not overlaps
    # and inside the figure
    fig_box = fig.bbox
    assert all(b.x0 >= fig_box.x0 and b.x1 <= fig_box.x1 and b.y0 >= fig_box.y0 for b in boxes)


@pytest.fixture(scope="module")
def fp8_graph(graphs) -> Path:
    """The tiny model's fp8 graph, built as `make calib PRECISION=fp8` builds it (the one Q/DQ step), from the
    fixture's fp32/fp16 export and max calibration on synthetic images."""
    from calibration.policy import DEFAULT_POLICY, Placement
    from calibration.quantize import TensorDataReader, build_qdq, ensure_opset

    fp32 = ensure_opset(onnx.load(str(graphs / f"{MODEL}.fp32.onnx")))
    x = np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32)
    path = graphs / f"{MODEL}.fp8.onnx"
    build_qdq(fp32, Placement.from_model(fp32, DEFAULT_POLICY), "max", TensorDataReader(x), path,
              fp16_model=onnx.load(str(graphs / f"{MODEL}.fp16.onnx")), cache=graphs / "ranges.json", qtype="fp8")
    return path


def test_fp8_graph_compared_layer_by_layer(graphs, fp8_graph, capsys):
    """make layers PRECISION=fp8: every shared tensor, the graph output's error equal to direct ONNX Runtime
    sessions', the Performer cores marked, the emulation stated, and the exit code following the first bad layer."""
    import onnxruntime as ort

    images = np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float32)
    fp32 = graphs / f"{MODEL}.fp32.onnx"
    res = L.compare_layers(fp32, fp8_graph, "fp8", images, L.DEFAULT_TOLERANCE["fp8"], tensorrt=False)
    name = "onnxruntime-cpu-fp8"
    assert res["runners"] == ["onnxruntime-cpu-fp32", name] and res["compared"] > 100
    # independent: the logits of both graphs from plain sessions
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], {"input": images})[0]
           for p in (fp32, fp8_graph)}
    direct = float(np.abs(run[fp8_graph].astype(np.float64) - run[fp32]).max())
    logits = next(r for r in res["tensors"] if r["tensor"] == "logits")["by_runner"][name]
    # (every tensor marked an output changes ONNX Runtime's fusions a little: equal to float32 rounding)
    assert direct > 0 and logits["max_abs"] == pytest.approx(direct, rel=1e-4)  # quantized, and the same number
    # the Performer cores are still recognised in the fp8 graph's reference
    internal = L.core_internal_tensors(onnx.load(str(fp32)))
    assert res["core_internal"] > 0 and {r["tensor"] for r in res["tensors"] if r["inside_performer_core"]} == \
        {r["tensor"] for r in res["tensors"]} & internal
    # quantized MatMul outputs carry fp8's error, larger than the fp16 export's alone
    attn = [r["by_runner"][name]["relative"] for r in res["tensors"] if r["module"] == "blocks.0.attn.qkv"]
    assert attn and max(attn) > 1e-3

    rc = L.main(["--model", MODEL, "--out", str(graphs), "--precision", "fp8", "--data", str(graphs / "images"),
                 "--images", "6", "--threads", "1"])
    report = json.loads((graphs / f"layers-{MODEL}-fp8.json").read_text())
    first = report["result"]["first_bad"][name]
    assert rc == (1 if first else 0), capsys.readouterr().err
    assert report["tolerance"] == 0.125 and "no FP8 GEMM accumulation is modelled" in report["emulation"]
    worst = max(r["by_runner"][name]["relative"] for r in report["result"]["tensors"] if not r["inside_performer_core"])
    assert (first is None) == (worst <= 0.125)
    md = (graphs / f"layers-{MODEL}-fp8.md").read_text()
    assert f"- {name}: emulated: ONNX Runtime rounds" in md and f"## {name}" in md


def test_tensorrt_fp8_comparison_needs_an_sm89_gpu(graphs, fp8_graph, monkeypatch):
    """The fp8 graph records SM 8.9: on an older GPU no engine is built and the report says why in one line; on
    an SM 8.9+ GPU the engine is built as for the other precisions."""
    from polygraphy.backend import trt as pg_trt

    from engines import build as B

    ref, cand = onnx.load(str(graphs / f"{MODEL}.fp32.onnx")), onnx.load(str(fp8_graph))
    pairs = L.shared_tensors(ref, cand)
    cand = L._rename_tensors(cand, {p["candidate_tensor"]: p["tensor"] for p in pairs})  # as compare_layers does
    names = [p["tensor"] for p in pairs][:5]
    built = []

    def fake_build(path, shapes, settings, *, mark_all_outputs=False):
        built.append(path)
        return B.BuiltEngine(b"ENGINE", "10.13.3.9", {"name": "GPU"}, Path("c"), 0.0, 8, "0")

    monkeypatch.setattr(L.TensorRTRunner, "availability", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(L, "build_serialized_engine", fake_build)
    monkeypatch.setattr(pg_trt, "EngineFromBytes", lambda data: data)
    monkeypatch.setattr(pg_trt, "TrtRunner", lambda engine, name: name)
    monkeypatch.setattr(L, "gpu_info", lambda: {"name": "Tesla T4", "compute_capability": "7.5"})
    runners, why = L._runners(ref, cand, names, "fp8", fp8_graph, True, batch_size=2)
    assert len(runners) == 2 and not built
    assert why == f"{fp8_graph} (a TensorRT fp8 graph) needs a GPU of compute capability 8.9 or later; this GPU " \
                  f"(Tesla T4) has 7.5"
    monkeypatch.setattr(L, "gpu_info", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    runners, why = L._runners(ref, cand, names, "fp8", fp8_graph, True, batch_size=2)
    assert why == "" and runners[-1] == "tensorrt-fp8" and len(built) == 1
