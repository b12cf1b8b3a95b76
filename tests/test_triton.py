"""make triton / serving.triton_repo: every config.pbtxt parsed with tritonclient's ModelConfig protobuf
and checked against the artifact it describes; the preprocessing model against the eval transform."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines import sidecar as S
from t2t_vit.data import DataConfig
from t2t_vit.files import file_sha256
from tests.engine_helpers import REPO, data_meta, make_test_sidecar, write_onnx

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed: make install")
from google.protobuf import text_format  # noqa: E402  (tritonclient brings protobuf)

from serving import triton_repo as R  # noqa: E402

MODEL = "t2t_vit_test"
WNIDS = ["n01440764", "n02102040", "n02979186"]


def _meta(precision: str) -> dict:
    return {"model": MODEL, "precision": precision, "num_classes": "3", "class_names": json.dumps(WNIDS),
            **data_meta(64)}


def _parse(path: Path):
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def _write_fp8_onnx(path: Path) -> Path:
    """The tiny graph with a float8e4m3fn Q/DQ pair on its pooled features (opset 19, as the fp8 graph has)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("QuantizeLinear", ["flat", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_fp8", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.01]),
         helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    for k, v in {**_meta("fp8"), "qdq_dtype": "float8e4m3fn", "requires_compute_capability": "8.9"}.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    for p in ("fp32", "fp16", "int8"):
        write_onnx(tmp_path / f"{MODEL}.{p}.onnx", metadata=_meta(p))
    _write_fp8_onnx(tmp_path / f"{MODEL}.fp8.onnx")
    return tmp_path


def _add_engine(out: Path, max_batch: int = 16, opt: int = 8, precision: str = "fp16",
                meta: dict | None = None) -> Path:
    onnx = out / f"{MODEL}.{precision}.onnx"
    engine = out / f"{MODEL}.{precision}.engine"
    engine.write_bytes(b"not a real plan: the repository only copies it")
    side = make_test_sidecar(model=MODEL, precision=precision, onnx_path=str(onnx), onnx_sha256=file_sha256(onnx),
                             engine_sha256=file_sha256(engine), onnx_metadata=meta or _meta(precision),
                             data_config=data_meta(64),
                             profile={"input": {"min": [1, 3, 64, 64], "opt": [opt, 3, 64, 64],
                                                "max": [max_batch, 3, 64, 64]}})
    S.write_sidecar(engine, side)
    return engine


def test_onnx_models_match_their_graphs(out, tmp_path):
    assert R.main(["--model", MODEL, "--out", str(out), "--max-batch-size", "8"]) == 0
    repo = out / "triton"
    names = sorted(p.name for p in repo.iterdir())
    assert names == [f"{MODEL}-{s}" for s in ("classify", "onnx-fp16", "onnx-fp32", "onnx-fp8", "onnx-int8",
                                              "preprocess")]
    import onnxruntime as ort

    for prec in ("fp32", "fp16", "int8", "fp8"):  # fp8: its float8 Q/DQ load in ONNX Runtime like the others
        folder = repo / f"{MODEL}-onnx-{prec}"
        cfg = _parse(folder / "config.pbtxt")
        sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        (i,), (o,) = sess.get_inputs(), sess.get_outputs()
        assert cfg.name == folder.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == \
            [(i.name, "TYPE_FP32", i.shape[1:])]
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output] == \
            [(o.name, "TYPE_FP32", [3])]
        assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
        assert [(w.batch_size, list(w.inputs["input"].dims), w.inputs["input"].random_data)
                for w in cfg.model_warmup] == [(1, [3, 64, 64], True), (8, [3, 64, 64], True)]
        assert (folder / "1" / "model.onnx").read_bytes() == (out / f"{MODEL}.{prec}.onnx").read_bytes()
        assert (folder / "labels.txt").read_text().split() == WNIDS
    ens = _parse(repo / f"{MODEL}-classify" / "config.pbtxt")
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == \
        [f"{MODEL}-preprocess", f"{MODEL}-onnx-fp32"]
    pre = _parse(repo / f"{MODEL}-preprocess" / "config.pbtxt")
    assert pre.backend == "python" and pb.DataType.Name(pre.input[0].data_type) == "TYPE_STRING"
    assert DataConfig.from_metadata(json.loads(pre.parameters["data_config"].string_value)) == \
        DataConfig.from_metadata(data_meta(64))
    # The ensemble's wiring: preprocess output -> classifier input, classifier output -> ensemble output.
    step_pre, step_cls = ens.ensemble_scheduling.step
    assert step_pre.output_map[pre.output[0].name] == step_cls.input_map["input"]
    assert list(pre.output[0].dims) == [3, 64, 64] and step_cls.output_map["logits"] == ens.output[0].name


def test_engine_model_from_its_sidecar(out):
    engine = _add_engine(out, max_batch=16, opt=6)
    plan = R.plan_repository(MODEL, out, max_batch_size=4)
    assert plan.ensemble_target.name == f"{MODEL}-trt-fp16"
    R.write_repository(plan, out / "triton")
    folder = out / "triton" / f"{MODEL}-trt-fp16"
    cfg = _parse(folder / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16 and cfg.default_model_filename == "model.plan"
    assert list(cfg.input[0].dims) == [3, 64, 64] and cfg.input[0].name == "input"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 6, 8, 16]
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert [w.batch_size for w in cfg.model_warmup] == [1, 16]
    built = json.loads((folder / "built_for.json").read_text())
    side = S.read_sidecar(engine)
    assert built["tensorrt_version"] == side["tensorrt_version"] and built["gpu"] == side["gpu"]
    assert (folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    # The ONNX models keep --max-batch-size.
    assert _parse(out / "triton" / f"{MODEL}-onnx-fp32" / "config.pbtxt").max_batch_size == 4


def test_fp8_engine_records_its_compute_capability(out):
    """An fp8 engine is a tensorrt_plan like the others; built_for.json adds the compute capability it needs (read
    from the sidecar's ONNX metadata, where make calib PRECISION=fp8 records it), and its note says so."""
    meta = {**_meta("fp8"), "requires_compute_capability": "8.9"}
    _add_engine(out, max_batch=8, opt=4, precision="fp8", meta=meta)
    plan = R.plan_repository(MODEL, out)
    R.write_repository(plan, out / "triton")
    folder = out / "triton" / f"{MODEL}-trt-fp8"
    cfg = _parse(folder / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    built = json.loads((folder / "built_for.json").read_text())
    assert built["requires_compute_capability"] == "8.9" and "compute capability 8.9 or later" in built["note"]
    # the fp8 graph itself is an ONNX Runtime model (KIND_CPU), with nothing built for a GPU
    onnx_fp8 = out / "triton" / f"{MODEL}-onnx-fp8"
    assert _parse(onnx_fp8 / "config.pbtxt").platform == "onnxruntime_onnx"
    assert not (onnx_fp8 / "built_for.json").exists()
    _add_engine(out)  # an fp16 engine records none
    R.write_repository(R.plan_repository(MODEL, out), out / "triton")
    fp16 = json.loads((out / "triton" / f"{MODEL}-trt-fp16" / "built_for.json").read_text())
    assert "requires_compute_capability" not in fp16 and "compute capability" not in fp16["note"]


def test_engine_whose_graph_changed_is_refused(out):
    _add_engine(out)
    write_onnx(out / f"{MODEL}.fp16.onnx", metadata={**_meta("fp16"), "note": "re-exported"})
    with pytest.raises(R.TritonRepoError, match="changed since"):
        R.plan_repository(MODEL, out)


def test_preprocess_model_is_the_eval_transform():
    spec = importlib.util.spec_from_file_location("preprocess_model", R.PREPROCESS_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    for cfg in (DataConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                DataConfig(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875)):
        for w, h in ((300, 200), (123, 457), (64, 64)):
            img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, "PNG")
            got = mod.transform(buf.getvalue(), cfg.as_dict())
            np.testing.assert_allclose(got, cfg.eval_transform()(img).numpy(), atol=1e-6)
    with pytest.raises(mod.BadImage):
        mod.transform(b"\x00not an image", DataConfig(64, (0.5,) * 3, (0.5,) * 3).as_dict())


def test_rewrite_is_whole_and_bad_input_exit_2(out, tmp_path, capsys):
    assert R.main(["--model", MODEL, "--out", str(out)]) == 0
    (out / f"{MODEL}.int8.onnx").unlink()
    assert R.main(["--model", MODEL, "--out", str(out)]) == 0
    assert not (out / "triton" / f"{MODEL}-onnx-int8").exists()  # a stale model does not survive a rewrite
    assert not [p for p in out.iterdir() if p.name.startswith(".triton")]
    capsys.readouterr()
    assert R.main(["--model", MODEL, "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("serving.triton_repo: error: no ONNX graph or engine") and "make onnx" in err


def test_make_triton(out):
    proc = subprocess.run(["make", "-s", "triton", f"MODEL={MODEL}", f"OUT={out}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "triton" / f"{MODEL}-classify" / "config.pbtxt").is_file()
