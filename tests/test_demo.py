"""`make demo`: the digits dataset writer, and a reduced end-to-end demo on the tiny model."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import demo


def test_digits_dataset_is_a_stratified_image_folder(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = demo.write_digits_dataset(tmp_path / "digits", size=40)
    files = {split: sorted((root / split).rglob("*.png")) for split in ("train", "val")}
    assert len(files["train"]) + len(files["val"]) == len(digits.target)
    # Every scan lands in the folder of its own label, exactly once.
    seen = [int(p.stem) for split in files.values() for p in split]
    assert sorted(seen) == list(range(len(digits.target)))
    for p in files["train"][::97] + files["val"][::31]:
        assert int(p.parent.name) == digits.target[int(p.stem)]
    # Stratified 80/20: every class keeps its share in val (within one image).
    val_counts = Counter(int(p.parent.name) for p in files["val"])
    for label, total in Counter(digits.target.tolist()).items():
        assert abs(val_counts[label] - 0.2 * total) <= 1
    # The PNG is the scan, upscaled: dark ink where the 8x8 scan has ink.
    p = files["val"][0]
    img = np.asarray(Image.open(p).convert("L").resize((8, 8), Image.BOX), np.float32)
    scan = digits.images[int(p.stem)]
    assert img.shape == (8, 8) and Image.open(p).size == (40, 40)
    assert np.corrcoef(img.ravel(), scan.ravel())[0, 1] < -0.8  # ink (high in the scan) is dark in the PNG
    # A second call reuses the tree instead of rewriting it.
    mtime = files["val"][0].stat().st_mtime_ns
    demo.write_digits_dataset(tmp_path / "digits", size=40)
    assert files["val"][0].stat().st_mtime_ns == mtime


def test_unknown_step_is_a_clear_error(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--steps", "data,fly"]) == 2
    assert "fly" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reduced_demo_runs_every_step_on_digits(tmp_path):
    """The digits path (what a fresh machine without ../shared/data gets), on the tiny model."""
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--dataset", "digits", "--model", "t2t_vit_test", "--epochs", "1",
                    "--train-images", "100", "--val-images", "60", "--calib-size", "16", "--threads", "1",
                    "--bench-seconds", "0.05", "--workers", "0"])
    summary = json.loads((out / "demo.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    failed = {k: (s["reason"], s["log"]) for k, s in steps.items() if s["status"] == "failed"}
    warned = [k for k, s in steps.items() if s["status"] == "warn"]
    assert not failed, failed
    assert rc == (1 if warned else 0)  # exit 1: a step missed a quality threshold (its files were written)
    for name in ("data", "train", "bench"):
        assert steps[name]["status"] == "ok", steps[name]
    # Quality thresholds of a one-epoch tiny model may be missed ("warn"); the files must exist anyway.
    for name in ("onnx", "calib", "calib-cpu", "calib-fp8", "parity"):
        assert steps[name]["status"] in ("ok", "warn"), steps[name]
    from engines.backends import backend_statuses

    trt = {s.backend: s for s in backend_statuses()}["tensorrt"]
    if not trt.available:
        assert steps["engine"]["status"] == "skipped" and steps["engine"]["reason"] == trt.reason
    model_dir = out / "model"
    for name in ("t2t_vit_test.fp32.onnx", "t2t_vit_test.fp16.onnx", "t2t_vit_test.int8.onnx", "t2t_vit_test.int8-cpu.onnx",
                 "t2t_vit_test.fp8.onnx", "t2t_vit_test.calib-fp8.md",
                 "parity-t2t_vit_test.json", "parity-t2t_vit_test.md", "parity-t2t_vit_test.png"):
        assert (model_dir / name).is_file(), name
    assert (out / "train" / "best.pth").is_file()
    assert list(model_dir.glob("bench-engines-*.md"))
    # Everything stays under the demo folder, and the summary names where each artifact is.
    text = (out / "demo-summary.md").read_text()
    for s in summary["steps"]:
        for o in s["outputs"]:
            assert o in text and Path(o).exists()
            assert Path(o).resolve().is_relative_to(out.resolve())
    parity = json.loads((model_dir / "parity-t2t_vit_test.json").read_text())
    assert parity["data"]["images_evaluated"] == 60
    assert parity["data"]["root"] == str(out.resolve() / "data" / "digits" / "val")
    # The checkpoint's own class list (digit folders) labels the parity data.
    assert parity["data"]["class_mapping"].startswith("10 folders -> the model's 10-class list")
    ort_fp32 = next(b for b in parity["backends"] if b["name"] == "onnxruntime-cpu-fp32")
    assert ort_fp32["top1_agreement"] == 100.0
    # The CPU int8 graph the demo made is a parity backend of its own, evaluated, not skipped.
    assert next(b for b in parity["backends"] if b["name"] == "onnxruntime-cpu-int8-cpu")["top1_agreement"] > 0
    # So is the fp8 graph (make calib PRECISION=fp8), on ONNX Runtime: an emulation, and the summary says so.
    fp8 = next(b for b in parity["backends"] if b["name"] == "onnxruntime-cpu-fp8")
    assert fp8["top1_agreement"] > 0 and fp8["emulated"]
    assert next(ln for ln in text.splitlines() if "onnxruntime-cpu-fp8" in ln).endswith("(emulated)")
    from t2t_vit.graphs import read_metadata

    assert read_metadata(model_dir / "t2t_vit_test.fp8.onnx")["qdq_dtype"] == "float8e4m3fn"
    if not trt.available:  # TensorRT's reason is printed once, at the engine step, and referred to by parity
        assert text.count(trt.reason.split(":")[0]) == 1 and "skipped: see the engine step\n" in text
    assert len(text.splitlines()) <= 48  # one screen


def test_fp8_engine_step_needs_the_gpu_the_graph_records(tmp_path, monkeypatch):
    """The engine step builds fp8 only on a GPU of the compute capability the fp8 graph records (SM 8.9)."""
    from tests.engine_helpers import write_onnx

    graph = write_onnx(tmp_path / "t2t_vit_test.fp8.onnx",
                       metadata={"precision": "fp8", "requires_compute_capability": "8.9"})
    monkeypatch.setattr(demo, "gpu_info", lambda: {"name": "NVIDIA A10G", "compute_capability": "8.6"})
    assert demo._gpu_shortfall(graph) == ("t2t_vit_test.fp8.onnx needs a GPU of compute capability 8.9 or later; "
                                          "this GPU (NVIDIA A10G) has 8.6")
    assert demo._gpu_shortfall(tmp_path / "missing.fp8.onnx") == ""  # the build step says it is missing
    monkeypatch.setattr(demo, "gpu_info", lambda: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    assert demo._gpu_shortfall(graph) == ""
