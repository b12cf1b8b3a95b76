"""What a user reads (issue 24, item 7): errors name the make variable and the flag, and no line floods.

Subprocess tests for the exit codes and the one-line errors of ``make`` targets and stage commands;
in-process tests for the summaries that replace repeated lines (worker cap, ONNX Runtime's calibration
prints, the export report's fp32 reasons, parity's skipped backends).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.image_helpers import noise_images

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
WNIDS = ["n01440764", "n02102040"]  # two Imagenette classes (tench, English springer)


def _make(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    """The command's own error lines (make's trailing 'make: *** ... Error 2' is make's, not ours)."""
    return [ln for ln in stderr.splitlines() if "error:" in ln and not ln.startswith("make: ***")]


def _folder(root: Path, per_class: int, size: int = 72) -> Path:
    return noise_images(root, WNIDS, per_class, size, name="{c}_{i}.jpg")


# ----- make: help and missing variables ---------------------------------------------------------------

def test_make_help_lists_clean_and_expands_variables():
    r = _make("help", "REPORT_DIR=somewhere")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("clean ") for ln in lines)
    assert "$(" not in r.stdout  # no make variable printed unexpanded
    assert any("somewhere/precision-" in ln for ln in lines)  # REPORT_DIR is shown with its value


@pytest.mark.parametrize("target, variable", [("validate", "DATA"), ("trtexec-log", "LOG")])
def test_make_without_its_input_variable_says_which(target, variable):
    r = _make(target, "MODEL=t2t_vit_test")
    assert r.returncode == 2
    errors = _error_lines(r.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"make {target}: error: set {variable}="), r.stderr
    assert "usage:" not in r.stderr + r.stdout  # not argparse's raw error


# ----- stage commands: the flag and the variable ---------------------------------------------------------

@pytest.mark.parametrize("module", ["export.to_onnx", "train.validate"])
def test_bad_img_size_names_flag_and_variable(module, tmp_path):
    extra = ["--data", str(tmp_path)] if module == "train.validate" else ["--val-images", "0"]
    r = _py("-m", module, "--model", "t2t_vit_test", "--img-size", "40", "--out", str(tmp_path / "o"), *extra)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r.stderr)
    assert "--img-size (IMG_SIZE=) must be a positive multiple of 16" in line and "try 32" in line
    assert "Traceback" not in r.stderr


def test_bad_img_size_recorded_in_a_checkpoint_names_the_checkpoint(tmp_path):
    import timm
    import torch

    import t2t_vit  # noqa: F401  (registers the models)
    from t2t_vit.checkpoint import build_model
    from t2t_vit.model import ModelConfigError

    ckpt = tmp_path / "odd.pth"
    sd = timm.create_model("t2t_vit_test", img_size=32).state_dict()
    torch.save({"state_dict": sd, "meta": {"model": "t2t_vit_test", "img_size": 40}}, ckpt)
    with pytest.raises(ModelConfigError, match=r"the img_size recorded in .*odd\.pth .*--img-size"):
        build_model("t2t_vit_test", checkpoint=ckpt)


def test_train_img_size_and_run_dir_errors_name_train_variables(tmp_path):
    data = tmp_path / "data"
    _folder(data / "train", 2), _folder(data / "val", 1)
    r = _py("-m", "train.train", "--model", "t2t_vit_test", "--data", str(data), "--img-size", "40",
            "--epochs", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert "--img-size (make train IMG_SIZE=)" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _py("-m", "train.train", "--model", "t2t_vit_test", "--data", str(data), "--img-size", "32",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--out", str(blocker / "run"))
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert "RUN_DIR=... / --out" in line and "OUT=" not in line.replace("RUN_DIR=", "")


def test_calib_size_zero_is_not_blamed_on_calib_data(tmp_path):
    _folder(tmp_path / "train", 1)
    r = _make("calib", "MODEL=t2t_vit_test", f"OUT={tmp_path / 'o'}", f"CALIB_DATA={tmp_path / 'train'}",
              "CALIB_SIZE=0")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert line == ("calibration.calib: error: CALIB_SIZE (--calib-size) must be a positive number of images, "
                    "got 0")
    assert not list((tmp_path / "o").glob("*"))  # nothing written (the locked folder may exist, empty)


# ----- floods -----------------------------------------------------------------------------------------

def test_workers_are_capped_at_the_usable_cores_with_one_note(tmp_path, monkeypatch, caplog):
    from t2t_vit import cli
    from t2t_vit.data import DataConfig, ImageBatcher, scan_image_folder

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cli, "_workers_noted", set())
    samples, _ = scan_image_folder(_folder(tmp_path / "imgs", 2, size=40))
    batcher = ImageBatcher(samples, DataConfig(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3), batch_size=2, num_workers=cores + 3)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger="t2t_vit"):
        warnings.simplefilter("always")
        for _ in range(3):  # three loaders, as in a training run
            assert sum(len(b[0]) for b in batcher) == 4
    assert not [w for w in seen if "worker" in str(w.message)]  # torch's DataLoader warning never fires
    notes = [r.getMessage() for r in caplog.records if "usable cores" in r.getMessage()]
    assert notes == [f"--workers {cores + 3} is more than the {cores} usable cores: using {cores} decoding processes"]
    assert cli.fit_workers(cores) == cores and cli.fit_workers(0) == 0


def test_once_per_line_collapses_a_librarys_repeats(capsys):
    from t2t_vit.cli import once_per_line

    with once_per_line("onnxruntime"):
        for _ in range(32):
            print("Collecting tensor data and making histogram ...")
        print("Number of tensors : 66")
    out = capsys.readouterr().out.splitlines()
    assert out == ["Collecting tensor data and making histogram ...", "Number of tensors : 66",
                   "(onnxruntime: 31 repeated lines not shown)"]


def test_calib_prints_a_summary_not_every_node_or_stride(tmp_path):
    # 64 calibration images = 2 ONNX Runtime strides of 32: its histogram line came twice, and each of the
    # 22 quantized nodes had its own line.
    _folder(tmp_path / "train", 32, size=40), _folder(tmp_path / "val", 2, size=40)
    ex = _py("-m", "export.to_onnx", "--model", "t2t_vit_test", "--out", str(tmp_path / "o"), "--val-images", "0")
    assert ex.returncode == 0, ex.stderr  # calib quantizes what make onnx wrote (it never exports itself)
    r = _py("-m", "calibration.calib", "--model", "t2t_vit_test", "--out", str(tmp_path / "o"),
            "--calib-data", str(tmp_path / "train"), "--calib-size", "64", "--val-data", str(tmp_path / "val"),
            "--method", "entropy", "--workers", "0", "--threads", "1", "--no-progress", timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("Collecting tensor data and making histogram") == 1
    assert "(onnxruntime: 1 repeated lines not shown)" in out
    assert not re.search(r"^\s+int8\s+\S+\s+\S+\s+/", out, re.M)  # no per-node listing
    report = json.loads((tmp_path / "o" / "t2t_vit_test.calib.json").read_text())
    assert f"every node: 'placement' in {tmp_path / 'o' / 't2t_vit_test.calib.json'}" in out
    assert len(report["placement"]["quantized"]) == 22  # ... where the nodes still are
    assert (ex.stdout + ex.stderr).count("RANDOM weights") == 1  # the export's banner, once


def test_export_report_states_each_fp32_reason_once(tmp_path):
    from export import to_onnx

    out = tmp_path / "o"
    assert to_onnx.main(["--model", "t2t_vit_test", "--img-size", "32", "--out", str(out), "--val-images", "0"]) == 0
    report = json.loads((out / "t2t_vit_test.export.json").read_text())
    md = (out / "t2t_vit_test.export.md").read_text()
    reasons = {t["reason"] for t in report["graphs"]["fp16"]["fp32_tensors"]}
    assert len(reasons) >= 2
    for reason in reasons:
        assert md.count(reason) == 1, reason
    ln_row = next(ln for ln in md.splitlines() if ln.startswith("| LayerNorm computed"))
    norms = {t["tensor"].rsplit("/", 1)[0] for t in report["graphs"]["fp16"]["fp32_tensors"]
             if t["reason"].startswith("LayerNorm") and "/" in t["tensor"]}
    assert len(norms) == 9 and all(f"`{m}`" in ln_row for m in norms)  # 2 T2T x 2 + 2 blocks x 2 + final norm


def test_parity_states_a_shared_skip_reason_once():
    from types import SimpleNamespace

    from evaluation.parity import not_run_groups, summary_lines

    trt = "the TensorRT Python package is not installed: pip install -e '.[tensorrt]'"
    results = [SimpleNamespace(name=f"tensorrt-{p}", status="skipped", reason=trt, metrics={}) for p in ("fp32", "fp16", "int8")]
    results.append(SimpleNamespace(name="onnxruntime-cpu-int8", status="skipped", reason="no graph", metrics={}))
    groups = not_run_groups(results)
    assert groups == [{"backends": ["tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"], "status": "skipped", "reason": trt},
                      {"backends": ["onnxruntime-cpu-int8"], "status": "skipped", "reason": "no graph"}]
    backends = [{"name": "pytorch-cpu-fp32", "status": "reference", "reason": "", "top1": 80.0}]
    lines = summary_lines({"backends": backends, "not_run": groups})
    assert "\n".join(lines).count(trt) == 1
    assert lines[1].split()[:5] == ["not", "run", "(skipped):", "tensorrt-fp32,", "tensorrt-fp16,"]