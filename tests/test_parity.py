"""Parity: the report checked against an independent computation on real Imagenette images.

The ONNX files here are made directly with torch.onnx / onnxruntime's own converters (not with the
project's export and calibration stages), and the independent side preprocesses images by hand with PIL
and numpy and runs onnxruntime sessions directly, so a bug shared by the parity code and the project's
batching/runners cannot hide itself.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from PIL import Image

from evaluation import parity
from evaluation.parity import Thresholds, parity_backends
from t2t_vit.backends import select_backends
from t2t_vit.runners import RunnerError

MODEL = "t2t_vit_test"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ------------------------------------------------------------------------------------------------
# Unit tests (no data)
# ------------------------------------------------------------------------------------------------
def test_thresholds_defaults_and_overrides():
    th = Thresholds()
    assert th.check("fp32", 0.0, 100.0) == []
    assert th.check("fp32", 0.0, 99.0)  # agreement below 99.9 %
    assert th.check("fp16", -0.2, 100.0)  # |delta| counts in both directions
    assert th.check("int8", 0.9, 50.0) == []
    assert th.check("int8", 1.1, 100.0)
    assert th.check("fp8", -0.9, 50.0) == [] and th.check("fp8", -1.1, 100.0)  # int8's budget (docs/parity.md)
    th.max_delta_top1["int8"] = 2.0
    assert th.check("int8", 1.1, 100.0) == []


def test_backend_vocabulary_is_the_runner_names():
    specs = parity_backends("cpu", "cpu")
    names = [s.name for s in specs]
    assert names[:2] == ["pytorch-cpu-fp32", "pytorch-cpu-bf16-autocast"]
    assert [s.name for s in select_backends("onnxruntime", specs)] == [
        f"onnxruntime-cpu-{p}" for p in ("fp32", "fp16", "int8", "int8-cpu", "fp8")]
    assert [s.name for s in select_backends("tensorrt", specs)] == [
        f"tensorrt-{p}" for p in ("fp32", "fp16", "int8", "fp8")]
    assert [s.name for s in select_backends("*-fp8", specs)] == ["onnxruntime-cpu-fp8", "tensorrt-fp8"]
    assert select_backends("onnxruntime-cpu-int8,tensorrt-fp16", names) == ["onnxruntime-cpu-int8", "tensorrt-fp16"]
    assert [s.runtime for s in select_backends("*-int8", specs)] == ["onnxruntime", "tensorrt"]
    # the old spellings are gone: the error names the backend that replaces them here
    with pytest.raises(RunnerError, match="old backend names .* gone; use onnxruntime-cpu-int8$"):
        select_backends("onnxruntime-cpu-fp32,ort-int8", names)
    with pytest.raises(RunnerError, match="use pytorch-cpu-bf16-autocast$"):
        select_backends("pytorch-autocast", names)
    with pytest.raises(RunnerError, match="unknown backend"):
        select_backends("tensorflow", names)


def test_old_backend_name_is_refused_with_exit_2_and_the_new_name(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    for cmd, new in ((["evaluation.parity", "--model", MODEL, "--data", str(tmp_path), "--backends", "trt-fp16"],
                      "tensorrt-fp16"),
                     (["engines.bench", "--model", MODEL, "--out", str(tmp_path), "--tensorrt", "off",
                       "--backends", "torch-cpu"], "pytorch-cpu-fp32")):
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, capture_output=True, text=True, timeout=120)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{cmd[0]}: error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and "old backend names" in errors[0] and f"use {new}" in errors[0], errors


# ------------------------------------------------------------------------------------------------
# Real images
# ------------------------------------------------------------------------------------------------
def _fit_head(model: torch.nn.Module, val: Path) -> None:
    """Give the random tiny model a least-squares head so its predictions vary between images."""
    from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset, scan_image_folder

    samples, _ = scan_image_folder(val)
    x, y, _ = ImageBatcher(class_balanced_subset(samples, 100, seed=123), DataConfig.from_model(model), 100).tensor()
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        mu, sd = f.mean(0), f.std(0)
        fs = (f - mu) / sd
        target = torch.nn.functional.one_hot(y, 10).float() - 0.1
        w = torch.linalg.solve(fs.T @ fs + 10 * torch.eye(fs.shape[1]), fs.T @ target).T * 20 / sd
        model.head.weight.copy_(w)
        model.head.bias.copy_(-w @ mu)


def _set_meta(path: Path, meta: dict[str, str]) -> None:
    m = onnx.load(str(path))
    del m.metadata_props[:]
    helper.set_model_props(m, meta)
    onnx.save(m, str(path))


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """A 10-class tiny checkpoint and fp32/fp16/int8/fp8 ONNX files made without the project's exporters (fp8:
    onnxruntime's own float8e4m3fn quantizer, which takes only its distribution calibration)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from t2t_vit.checkpoint import build_model
    from t2t_vit.files import file_sha256
    from t2t_vit.data import DataConfig

    val = shared_data / "imagenette2" / "val"
    out = tmp_path_factory.mktemp("parity")
    wnids = sorted(d.name for d in val.iterdir() if d.is_dir())
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=10).eval()
    _fit_head(model, val)
    ckpt = out / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": MODEL, "img_size": 64, "num_classes": 10, "class_names": wnids, "config": {}}},
               ckpt)
    meta = {"model": MODEL, "num_classes": "10", "checkpoint_sha256": file_sha256(ckpt),
            **DataConfig.from_model(model).to_metadata()}
    fp32 = out / f"{MODEL}.fp32.onnx"
    model.set_soft_split_impl("grouped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(fp32), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          dynamo=False, opset_version=17)
    model.set_soft_split_impl("unfold")
    _set_meta(fp32, {**meta, "precision": "fp32"})
    fp16 = out / f"{MODEL}.fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    _set_meta(fp16, {**meta, "precision": "fp16"})
    int8 = out / f"{MODEL}.int8.onnx"

    class Reader(CalibrationDataReader):  # static Q/DQ: per-image results do not depend on the batch
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.batches = iter([{"input": torch.randn(4, 3, 64, 64, generator=g).numpy()} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    _set_meta(int8, {**meta, "precision": "int8"})
    fp8 = out / f"{MODEL}.fp8.onnx"
    quantize_static(str(fp32), str(fp8), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], activation_type=QuantType.QFLOAT8E4M3FN,
                    weight_type=QuantType.QFLOAT8E4M3FN,
                    calibrate_method=CalibrationMethod.Distribution)
    _set_meta(fp8, {**meta, "precision": "fp8", "qdq_dtype": "float8e4m3fn"})
    return {"val": val, "out": out, "ckpt": ckpt, "model": model, "wnids": wnids,
            "onnx": {"fp32": fp32, "fp16": fp16, "int8": int8, "fp8": fp8}}


def _preprocess_by_hand(path: str, size: int = 64, crop_pct: float = 0.9) -> np.ndarray:
    """Bicubic resize of the shorter side to floor(size / crop_pct), center crop, normalize (CHW float32)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short = math.floor(size / crop_pct)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, np.float32) / 255.0
    return ((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _run(args: list[str]) -> int:
    return parity.main(["--model", MODEL, "--no-progress", "--workers", "0", *args])


@pytest.mark.data
def test_report_matches_independent_onnxruntime(setup):
    import onnxruntime as ort

    out = setup["out"]
    rc = _run(["--checkpoint", str(setup["ckpt"]), "--out", str(out), "--data", str(setup["val"]),
               "--limit", "30", "--batch-size", "8", "--backends", "pytorch,onnxruntime", "--save-predictions"])
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    assert rc == (0 if report["passed"] else 1)
    assert report["data"]["images_evaluated"] == 30
    for suffix in (".md", ".png", "-disagreements.csv", "-predictions.csv"):
        assert (out / f"parity-{MODEL}{suffix}").stat().st_size > 0
    with open(out / f"parity-{MODEL}-predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    # LIMIT is class balanced: 3 images from each of the 10 synset folders.
    folders = [Path(r["path"]).parent.name for r in rows]
    assert sorted(set(folders)) == setup["wnids"] and all(folders.count(w) == 3 for w in setup["wnids"])
    # Labels follow the checkpoint's class list.
    assert all(int(r["label"]) == setup["wnids"].index(Path(r["path"]).parent.name) for r in rows)

    x = np.stack([_preprocess_by_hand(r["path"]) for r in rows])
    labels = np.array([setup["wnids"].index(Path(r["path"]).parent.name) for r in rows])
    with torch.no_grad():
        ref = setup["model"](torch.from_numpy(x)).numpy()
    backends = {b["name"]: b for b in report["backends"]}
    ref_b = backends["pytorch-cpu-fp32"]
    assert ref_b["status"] == "reference"
    assert [int(r["reference"]) for r in rows] == ref.argmax(1).tolist()
    assert ref_b["top1"] == pytest.approx(100 * np.mean(ref.argmax(1) == labels))
    ref_top1 = 100 * np.mean(ref.argmax(1) == labels)
    for prec in ("fp32", "fp16", "int8", "fp8"):
        b = backends[f"onnxruntime-cpu-{prec}"]
        assert b["emulated"] == (prec == "fp8"), prec  # ONNX Runtime runs the fp8 graph's Q/DQ: an emulation
        sess = ort.InferenceSession(str(setup["onnx"][prec]), providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {"input": x})[0].astype(np.float64)
        pred = logits.argmax(1)
        assert [int(r[b["name"]]) for r in rows] == pred.tolist(), prec
        assert b["top1"] == pytest.approx(100 * np.mean(pred == labels))
        top5 = np.argsort(-logits, 1)[:, :5]
        assert b["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
        assert b["delta_top1"] == pytest.approx(b["top1"] - ref_top1)
        assert b["top1_agreement"] == pytest.approx(100 * np.mean(pred == ref.argmax(1)))
        assert b["mean_abs_dlogit"] == pytest.approx(np.abs(logits - ref).mean(), rel=0.05, abs=1e-6)
        assert b["max_abs_dlogit"] == pytest.approx(np.abs(logits - ref).max(), rel=0.05, abs=1e-6)
        assert b["status"] in ("pass", "fail") and b["images_per_s"] > 0
    # The reference's own predictions vary, so agreement is a real check, not a constant.
    assert len(set(ref.argmax(1).tolist())) >= 3
    # The disagreement list holds exactly the images where some backend's top-1 differs.
    with open(out / f"parity-{MODEL}-disagreements.csv") as f:
        dis = {r["path"] for r in csv.DictReader(f)}
    names = ["pytorch-cpu-bf16-autocast", "onnxruntime-cpu-fp32", "onnxruntime-cpu-fp16", "onnxruntime-cpu-int8",
             "onnxruntime-cpu-fp8"]
    assert dis == {r["path"] for r in rows if any(r[n] != r["reference"] for n in names)}
    skipped = [b["name"] for b in report["backends"] if b["status"] == "skipped"]
    # tensorrt-* were not selected; of the ONNX graphs only int8-cpu (not made here) is missing
    assert skipped == ["onnxruntime-cpu-int8-cpu"]
    assert report["host"]["cpu_cores"] >= 1
    # The fp8 row says it is emulated, and what the emulation leaves out, in the report and on the chart's axis.
    fp8 = backends["onnxruntime-cpu-fp8"]
    assert fp8["precision"] == "fp8" and "no FP8 GEMM accumulation is modelled" in fp8["emulation"]
    assert fp8["max_abs_dlogit"] > 0  # quantized, not a copy of the fp32 graph
    md = (out / f"parity-{MODEL}.md").read_text()
    assert "| onnxruntime-cpu-fp8 | fp8 (emulated) |" in md
    assert f"- onnxruntime-cpu-fp8: {fp8['emulation']}." in md
    assert "fp8 1" in md.split("Thresholds:")[1]  # its default threshold is stated


@pytest.mark.data
def test_broken_and_stale_artifacts_fail_the_run(setup, tmp_path, capsys):
    """A stale int8 file is refused before anything runs (exit 2, the fix named); a wrong fp16 graph fails
    its threshold (exit 1)."""
    out = tmp_path
    shutil.copy(setup["onnx"]["fp32"], out / f"{MODEL}.fp32.onnx")
    # "fp16" graph whose head bias is shifted: a conversion bug that flips predictions.
    bad = onnx.load(str(setup["onnx"]["fp32"]))
    for init in bad.graph.initializer:
        if init.name.endswith("head.bias"):
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[3] += 5.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    meta = {p.key: p.value for p in bad.metadata_props}
    onnx.save(bad, str(out / f"{MODEL}.fp16.onnx"))
    _set_meta(out / f"{MODEL}.fp16.onnx", {**meta, "precision": "fp16"})
    shutil.copy(setup["onnx"]["int8"], out / f"{MODEL}.int8.onnx")
    _set_meta(out / f"{MODEL}.int8.onnx", {**meta, "precision": "int8", "checkpoint_sha256": "0" * 64})

    common = ["--checkpoint", str(setup["ckpt"]), "--out", str(out), "--data", str(setup["val"]), "--limit", "20",
              "--backends", "onnxruntime-cpu-fp32,onnxruntime-cpu-fp16,onnxruntime-cpu-int8"]
    assert _run(common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another checkpoint" in err and "make calib MODEL=t2t_vit_test" in err
    assert not (out / f"parity-{MODEL}.json").exists()  # refused before anything ran

    shutil.copy(setup["onnx"]["int8"], out / f"{MODEL}.int8.onnx")  # the right int8 graph
    assert _run(common) == 1
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    b = {x["name"]: x for x in report["backends"]}
    assert b["onnxruntime-cpu-fp32"]["status"] == "pass" and b["onnxruntime-cpu-fp32"]["top1_agreement"] == 100.0
    assert b["onnxruntime-cpu-fp16"]["status"] == "fail" and "delta top-1" in b["onnxruntime-cpu-fp16"]["reason"]
    assert b["onnxruntime-cpu-fp16"]["top1_agreement"] < 100.0
    assert not report["passed"] and report["verdict"] == "FAIL"
    md = (out / f"parity-{MODEL}.md").read_text()
    assert "FAIL" in md

    # Thresholds are configurable: a generous fp16 limit and no int8 file make the run pass.
    (out / f"{MODEL}.int8.onnx").unlink()
    assert _run(common + ["--max-delta-top1", "fp16=100"]) == 0
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    b = {x["name"]: x for x in report["backends"]}
    assert b["onnxruntime-cpu-fp16"]["status"] == "pass"
    assert b["onnxruntime-cpu-int8"]["status"] == "skipped" and "make calib" in b["onnxruntime-cpu-int8"]["reason"]


@pytest.mark.data
def test_flat_folder_with_kaggle_labels_and_1000_class_model(shared_data, tmp_path):
    """ILSVRC-style flat folder + LOC_val_solution.csv, 1000-class model: labels in ImageNet-1k order."""
    val = shared_data / "imagenette2" / "val"
    table = {}
    for line in (shared_data / "imagenet1k_classes.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isdigit():
            table[parts[1]] = int(parts[0])
    flat = tmp_path / "val"
    flat.mkdir()
    rows = ["ImageId,PredictionString"]
    expected = {}
    for i, wnid in enumerate(sorted(d.name for d in val.iterdir() if d.is_dir())[:4]):
        src = sorted((val / wnid).iterdir())[0]
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (flat / f"{name}.JPEG").symlink_to(src)  # a link, not a copy of the data
        rows.append(f"{name},{wnid} 1 2 30 40 {wnid} 5 6 70 80")
        expected[name] = table[wnid]
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = _run(["--out", str(out), "--data", str(flat), "--labels", str(labels), "--backends", "pytorch-cpu-fp32",
               "--save-predictions"])
    assert rc == 0
    with open(out / f"parity-{MODEL}-predictions.csv") as f:
        got = {Path(r["path"]).stem: int(r["label"]) for r in csv.DictReader(f)}
    assert got == expected
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    assert report["num_classes"] == 1000 and report["data"]["layout"] == "flat+labels"


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = _run(["--out", str(tmp_path), "--data", str(tmp_path / "nope"), "--backends", "pytorch-cpu-fp32"])
    assert rc == 2
    assert "DATA=" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.data
def test_tensorrt_engines_join_the_report(setup, tmp_path):
    """On a GPU machine with TensorRT: build an fp32 engine with `engines.build` and check its parity."""
    import subprocess
    import sys

    for prec in ("fp32",):
        shutil.copy(setup["onnx"][prec], tmp_path / f"{MODEL}.{prec}.onnx")
    subprocess.run([sys.executable, "-m", "engines.build", "--model", MODEL, "--checkpoint", str(setup["ckpt"]),
                    "--out", str(tmp_path), "--precision", "fp32"], check=True)
    rc = _run(["--checkpoint", str(setup["ckpt"]), "--out", str(tmp_path), "--data", str(setup["val"]),
               "--limit", "20", "--backends", "tensorrt-fp32"])
    report = json.loads((tmp_path / f"parity-{MODEL}.json").read_text())
    b = {x["name"]: x for x in report["backends"]}
    assert b["tensorrt-fp32"]["status"] == "pass", b["tensorrt-fp32"]
    assert rc == 0


def test_one_based_labels_file_is_called_out(tmp_path, capsys):
    """A 'filename label' list written 1-based passes the range check (labels stay below the class count) but
    shifts every label by one: the report and the terminal say so, and show the label range and counts."""
    import timm

    model = timm.create_model(MODEL, num_classes=10, img_size=32)
    sd = model.state_dict()
    sd["head.weight"].zero_()
    sd["head.bias"].zero_()
    sd["head.bias"][3] = 10.0  # predicts class 3 for every image
    ckpt = tmp_path / "ck.pth"
    torch.save({"state_dict": sd, "meta": {"model": MODEL, "img_size": 32, "num_classes": 10,
                                           "class_names": [f"c{i}" for i in range(10)]}}, ckpt)
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(flat / f"img{i}.png")
        rows.append(f"img{i}.png 4")  # class 3, written 1-based
    (tmp_path / "labels.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = _run(["--checkpoint", str(ckpt), "--out", str(out), "--data", str(flat), "--labels",
               str(tmp_path / "labels.txt"), "--backends", "pytorch-cpu-fp32", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    d = report["data"]
    assert d["label_shift_check"] == {"top1_as_given": 0.0, "top1_label_minus_1": 100.0, "top1_label_plus_1": 0.0,
                                      "looks_one_based": True}
    assert d["labels"]["min"] == d["labels"]["max"] == 4 and d["labels"]["per_class"] == {"4 c4": 6}
    assert any("looks 1-based" in w for w in d["label_warnings"])
    assert "looks 1-based" in capsys.readouterr().out
    md = (out / f"parity-{MODEL}.md").read_text()
    assert "LABEL WARNING" in md and "indices 4..4 (no label 0)" in md


def test_labels_exactly_one_to_k_are_suspicious():
    from t2t_vit.labels import one_based_suspicions, shifted_label_check

    assert one_based_suspicions([1, 2, 3, 1, 2], 1000)[0].startswith("labels: the labels are exactly 1..3")
    assert one_based_suspicions([0, 1, 2], 1000) == [] and one_based_suspicions([1, 5, 9], 10) == []
    ok = shifted_label_check([0, 1, 2, 2], [0, 1, 2, 1])
    assert ok["top1_as_given"] == 75.0 and not ok["looks_one_based"]


def test_required_fp8_engine_on_an_older_gpu_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """tensorrt-fp8 on a GPU below the SM 8.9 its engine records: skipped with the requirement, and under --require
    (REQUIRE=) a refusal in one line (exit 2) before anything runs; nothing written. TensorRT and the GPU are faked:
    the engine is never deserialized."""
    import engines.backends as eb
    from engines import sidecar as S
    from engines.trt_runtime import TensorRTRunner
    from tests.engine_helpers import make_test_sidecar

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(flat / "img0.png")
    (tmp_path / "labels.txt").write_text("img0.png 0\n")
    out = tmp_path / "out"
    out.mkdir()
    engine = out / f"{MODEL}.fp8.engine"
    engine.write_bytes(b"never deserialized")
    S.write_sidecar(engine, make_test_sidecar(model=MODEL, precision="fp8",
                                              onnx_metadata={"model": MODEL, "precision": "fp8",
                                                             "requires_compute_capability": "8.9"}))
    monkeypatch.setattr(TensorRTRunner, "availability", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(eb, "gpu_info", lambda: {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"})
    rc = _run(["--out", str(out), "--data", str(flat), "--labels", str(tmp_path / "labels.txt"), "--img-size", "32",
               "--backends", "pytorch-cpu-fp32", "--require", "tensorrt-fp8", "--threads", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("evaluation.parity: error:")]
    assert rc == 2 and len(err) == 1, err
    assert "tensorrt-fp8" in err[0] and "needs a GPU of compute capability 8.9 or later" in err[0]
    assert "NVIDIA A100-SXM4-40GB) has 8.0" in err[0]
    assert not (out / f"parity-{MODEL}.json").exists()
