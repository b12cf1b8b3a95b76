"""Wrong, damaged and missing graphs as a user meets them, and parity runs that compare nothing.

Every stage that takes an ONNX graph (parity, make layers, make bench-baselines, calib, engines.build)
checks the graph's recorded model, precision and checkpoint with one shared check
(:func:`t2t_vit.graphs.expect_graph`) and refuses with one line naming the make command that fixes it;
unreadable files (0 bytes, truncated) are one line too. The commands run as a user runs them (a
subprocess, the exit code and stderr as the shell sees them); graphs come from the project's exporter on
the tiny registered model, images are random PNGs.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from t2t_vit.graphs import GraphError, expect_graph, graph_mismatch, read_metadata
from tests.image_helpers import noise_images

REPO = Path(__file__).resolve().parents[1]
MODEL = "t2t_vit_test"
SHA_A, SHA_B = "a" * 64, "b" * 64

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """t2t_vit_test.{fp32,fp16}.onnx from the project's exporter (random weights, seed 0)."""
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model

    out = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    export_model(build_model(MODEL).eval(), out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return noise_images(tmp_path_factory.mktemp("images") / "val")


def _folder(exported: Path, dst: Path, **slots: str) -> Path:
    """``dst`` with graphs copied into slots: ``fp32="fp16"`` puts the fp16 graph in the fp32 slot."""
    dst.mkdir(parents=True, exist_ok=True)
    for slot, src in slots.items():
        shutil.copy(exported / f"{MODEL}.{src}.onnx", dst / f"{MODEL}.{slot.replace('_', '-')}.onnx")
    return dst


def _run(module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, tool: str) -> str:
    """The refusal a user sees: exit 2, no traceback, one ``<tool>: error:`` line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{tool}: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _set_meta(path: Path, **changes: str) -> None:
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(changes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


# ------------------------------------------------------------------------------------------------
# The shared check
# ------------------------------------------------------------------------------------------------
def test_graph_mismatch_reads_model_precision_and_checkpoint():
    meta = {"model": MODEL, "precision": "fp32", "checkpoint_sha256": SHA_A}
    assert graph_mismatch(meta, model=MODEL, precision="fp32", checkpoint_sha=SHA_A) == ""
    assert "holds t2t_vit_test" in graph_mismatch(meta, model="t2t_vit_7", precision="fp32")
    assert "is a fp32 graph" in graph_mismatch(meta, model=MODEL, precision="fp16")
    assert "another checkpoint" in graph_mismatch(meta, model=MODEL, checkpoint_sha=SHA_B)
    assert "no checkpoint" in graph_mismatch(meta, model=MODEL, checkpoint_sha="")  # a run on random weights
    assert graph_mismatch(meta, model=MODEL, checkpoint_sha=None) == ""  # not checked
    random = {**meta, "checkpoint_sha256": "none (random weights)"}
    assert "random weights" in graph_mismatch(random, model=MODEL, checkpoint_sha=SHA_A)
    assert graph_mismatch(random, model=MODEL, checkpoint_sha="") == ""
    assert graph_mismatch({}, model=MODEL, precision="int8", checkpoint_sha=SHA_A) == ""  # older files: no keys


def test_expect_graph_refuses_with_the_make_command(exported, tmp_path):
    out = _folder(exported, tmp_path, fp32="fp16")
    with pytest.raises(GraphError, match=r"is a fp16 graph .*`make onnx MODEL=t2t_vit_test CHECKPOINT=c.pth OUT="):
        expect_graph(out / f"{MODEL}.fp32.onnx", model=MODEL, precision="fp32", checkpoint="c.pth", out=out)
    with pytest.raises(GraphError, match=r"not found: create it with `make calib MODEL=t2t_vit_test"):
        expect_graph(out / f"{MODEL}.int8.onnx", model=MODEL, precision="int8")
    (out / "empty.onnx").write_bytes(b"")
    with pytest.raises(GraphError, match="0 bytes"):
        read_metadata(out / "empty.onnx")
    data = (exported / f"{MODEL}.fp32.onnx").read_bytes()
    (out / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphError, match="not a readable ONNX file"):
        read_metadata(out / "cut.onnx")


# ------------------------------------------------------------------------------------------------
# Parity: nothing compared, --require, not-run backends listed once, BATCH_SIZE
# ------------------------------------------------------------------------------------------------
PARITY_ARGS = ["--workers", "0", "--no-progress", "--threads", "1"]


def test_parity_that_compares_nothing_is_refused(tmp_path, images):
    """Every backend asked for is skipped (no graph, no engine or no TensorRT): not a PASS but exit 2 with
    one line naming each backend and why it did not run; nothing is written."""
    out = tmp_path / "empty"
    proc = _run("evaluation.parity", "--model", MODEL, "--out", str(out), "--data", str(images),
                "--backends", "onnxruntime-cpu-int8-cpu,tensorrt", *PARITY_ARGS)
    line = _one_line_error(proc, "evaluation.parity")
    assert "nothing to compare" in line and "PASS" not in proc.stdout + proc.stderr
    for name in ("onnxruntime-cpu-int8-cpu", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"):
        assert line.count(name) == 1, line  # each asked-for backend once, with its reason
    assert "make calib MODEL=t2t_vit_test TARGET=cpu" in line
    assert not out.exists() or not list(out.glob("parity-*"))


def test_make_parity_require_batch_size_and_not_run_listed_once(exported, tmp_path, images):
    out = _folder(exported, tmp_path / "o", fp32="fp32")
    make = ["make", "parity", f"PYTHON={sys.executable}", f"MODEL={MODEL}", f"OUT={out}", f"DATA={images}"]
    relaxed = "ARGS=" + " ".join(PARITY_ARGS + ["--min-agreement", "fp32=0", "--max-delta-top1", "fp32=100"])
    # REQUIRE= names a backend that cannot run: refused before the run, naming it and how to make its graph.
    proc = subprocess.run([*make, "BACKENDS=onnxruntime-cpu-fp32", "REQUIRE=onnxruntime-cpu-int8", relaxed],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    line = _one_line_error(proc, "evaluation.parity")
    assert "--require (REQUIRE=) onnxruntime-cpu-int8: did not run" in line and "make calib" in line
    assert not (out / f"parity-{MODEL}.json").exists()

    # REQUIRE= met, BATCH_SIZE= honoured; the backends that did not run are listed once per reason.
    proc = subprocess.run([*make, "BACKENDS=onnxruntime-cpu-fp32,onnxruntime-cpu-int8,tensorrt",
                           "REQUIRE=onnxruntime-cpu-fp32", "BATCH_SIZE=3", relaxed],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / f"parity-{MODEL}.json").read_text())
    assert report["batch_size"] == 3 and report["required"] == ["onnxruntime-cpu-fp32"]
    assert report["compared"] == ["onnxruntime-cpu-fp32"] and report["verdict"] == "PASS"
    not_run = [n for g in report["not_run"] for n in g["backends"]]
    assert sorted(not_run) == ["onnxruntime-cpu-int8", "tensorrt-fp16", "tensorrt-fp32", "tensorrt-fp8", "tensorrt-int8"]
    md = (out / f"parity-{MODEL}.md").read_text()
    assert "batch size 3" in md
    for g in report["not_run"]:
        assert proc.stdout.count(g["reason"]) == 1 and md.count(g["reason"]) == 1, g["reason"]


def test_parity_refuses_a_wrong_or_unreadable_graph(exported, tmp_path, images):
    args = ["--model", MODEL, "--data", str(images), "--backends", "onnxruntime-cpu-fp32", *PARITY_ARGS]
    out = _folder(exported, tmp_path / "swapped", fp32="fp16")
    proc = _run("evaluation.parity", "--out", str(out), *args)
    line = _one_line_error(proc, "evaluation.parity")
    assert "is a fp16 graph (metadata precision)" in line and f"`make onnx MODEL={MODEL}" in line
    assert not (out / f"parity-{MODEL}.json").exists()
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / f"{MODEL}.fp32.onnx").write_bytes(b"")
    proc = _run("evaluation.parity", "--out", str(tmp_path / "zero"), *args)
    line = _one_line_error(proc, "evaluation.parity")
    assert "holds no ONNX graph (0 bytes" in line and f"`make onnx MODEL={MODEL}" in line


# ------------------------------------------------------------------------------------------------
# make layers: truncated int8, 0-byte fp16, another model's graph, a candidate from other weights
# ------------------------------------------------------------------------------------------------
def test_layers_refuses_damaged_and_wrong_graphs(exported, tmp_path, images):
    from evaluation.layerwise import main

    data = exported / f"{MODEL}.fp16.onnx"
    cut = _folder(exported, tmp_path / "cut", fp32="fp32")
    (cut / f"{MODEL}.int8.onnx").write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = _run("evaluation.layerwise", "--model", MODEL, "--out", str(cut), "--precision", "int8",
                "--data", str(images), "--images", "2", "--no-tensorrt")
    assert "not a readable ONNX file" in _one_line_error(proc, "evaluation.layerwise")

    zero = _folder(exported, tmp_path / "zero", fp32="fp32")
    (zero / f"{MODEL}.fp16.onnx").write_bytes(b"")
    common = ["--data", str(images), "--images", "2", "--no-tensorrt", "--threads", "1"]
    assert main(["--model", MODEL, "--out", str(zero), "--precision", "fp16", *common]) == 2

    # Another model's graphs in t2t_vit_7's slots: refused by their recorded model name.
    other = tmp_path / "other"
    other.mkdir()
    for p in ("fp32", "fp16"):
        shutil.copy(exported / f"{MODEL}.{p}.onnx", other / f"t2t_vit_7.{p}.onnx")
    proc = _run("evaluation.layerwise", "--model", "t2t_vit_7", "--out", str(other), "--precision", "fp16", *common)
    line = _one_line_error(proc, "evaluation.layerwise")
    assert "holds t2t_vit_test (metadata model), not t2t_vit_7" in line and "make onnx MODEL=t2t_vit_7" in line

    # An fp16 candidate exported from other weights than the fp32 graph compares two different networks.
    stale = _folder(exported, tmp_path / "stale", fp32="fp32", fp16="fp16")
    _set_meta(stale / f"{MODEL}.fp16.onnx", checkpoint_sha256=SHA_B)
    assert main(["--model", MODEL, "--out", str(stale), "--precision", "fp16", *common]) == 2


# ------------------------------------------------------------------------------------------------
# make bench-baselines: a 0-byte fp32 graph, another model's graph
# ------------------------------------------------------------------------------------------------
def test_bench_baselines_refuses_damaged_and_wrong_graphs(exported, tmp_path):
    bench = ["--tensorrt", "off", "--batches", "1", "--backends", "onnxruntime-cpu-fp32", "--min-time", "0",
             "--min-iters", "1", "--warmup", "0", "--no-progress", "--threads", "1"]
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / f"{MODEL}.fp32.onnx").write_bytes(b"")
    proc = _run("engines.bench", "--model", MODEL, "--out", str(zero), *bench)
    assert "0 bytes" in _one_line_error(proc, "engines.bench")
    assert not list(zero.glob("bench-engines-*"))

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(exported / f"{MODEL}.fp32.onnx", other / "t2t_vit_7.fp32.onnx")
    proc = _run("engines.bench", "--model", "t2t_vit_7", "--out", str(other), *bench)
    line = _one_line_error(proc, "engines.bench")
    assert "holds t2t_vit_test" in line and "make onnx MODEL=t2t_vit_7" in line
    assert not list(other.glob("bench-engines-*"))


# ------------------------------------------------------------------------------------------------
# calib: never exports (the export report stays the export's), refuses a wrong fp32 graph
# ------------------------------------------------------------------------------------------------
def test_calib_refuses_missing_or_wrong_graphs_and_keeps_the_export_report(exported, tmp_path):
    train = noise_images(tmp_path / "data" / "train")
    out = _folder(exported, tmp_path / "o", fp16="fp16")
    report = out / f"{MODEL}.export.json"
    report.write_text('{"validation": "a validated export"}\n')
    args = ["--model", MODEL, "--out", str(out), "--calib-data", str(train), "--calib-size", "2", "--no-eval",
            "--no-progress", "--workers", "0", "--threads", "1"]
    proc = _run("calibration.calib", *args)
    line = _one_line_error(proc, "calibration.calib")
    assert "t2t_vit_test.fp32.onnx not found" in line and f"`make onnx MODEL={MODEL}" in line
    assert report.read_text() == '{"validation": "a validated export"}\n'  # untouched
    assert sorted(p.name for p in out.iterdir()) == [f"{MODEL}.export.json", f"{MODEL}.fp16.onnx"]

    # The fp16 graph in the fp32 slot: its metadata says so, and calib would measure int8 against it.
    shutil.copy(exported / f"{MODEL}.fp16.onnx", out / f"{MODEL}.fp32.onnx")
    proc = _run("calibration.calib", *args)
    assert "is a fp16 graph (metadata precision)" in _one_line_error(proc, "calibration.calib")
    assert not (out / f"{MODEL}.int8.onnx").exists()
