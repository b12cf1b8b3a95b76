"""Shared numeric flags (t2t_vit.cli): ``--batch-size`` of every image-batching stage and ``--limit`` of every
stage that takes a subset are whole numbers >= 1, refused while parsing with one line that names the flag
and the make variable, exit 2, before a file is written (issue 24, items 4 and 6)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

# Each stage with its required flags; the data paths need not exist: the flag is refused before they are read.
STAGES = {
    "train.validate": ["--data", "{tmp}/val"],
    "evaluation.parity": ["--data", "{tmp}/val"],
    "calibration.calib": ["--calib-data", "{tmp}/train"],
    "export.to_onnx": [],
}


def _run(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    return subprocess.run([sys.executable, "-m", module, "--model", "t2t_vit_test", "--out", str(tmp_path / "out"),
                           *argv], cwd=REPO, capture_output=True, text=True, timeout=100)


@pytest.mark.parametrize("module", sorted(STAGES))
def test_batch_size_zero_is_one_line_and_exit_2(module, tmp_path):
    r = _run(module, STAGES[module] + ["--batch-size", "0"], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no usage block, no traceback
    assert "--batch-size" in lines[0] and "BATCH_SIZE" in lines[0] and "got '0'" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _parser(module: str):
    import importlib

    mod = importlib.import_module(module)
    return mod.get_args_parser()


@pytest.mark.parametrize("value", ["-4", "many", "2.5"])
@pytest.mark.parametrize("module", sorted(STAGES) + ["evaluation.layerwise", "evaluation.precision"])
def test_batch_size_parsing_in_process(module, value, tmp_path, capsys):
    argv = ["--model", "t2t_vit_test"] + [a.replace("{tmp}", str(tmp_path)) for a in STAGES.get(module, [])]
    with pytest.raises(SystemExit) as e:
        _parser(module).parse_args(argv + ["--batch-size", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size (make BATCH_SIZE=)" in err[0] and f"got {value!r}" in err[0]
    assert _parser(module).parse_args(argv + ["--batch-size", "3"]).batch_size == 3


@pytest.mark.parametrize("module,flag", [("train.validate", "--limit"), ("evaluation.parity", "--limit"),
                                         ("evaluation.precision", "--limit"), ("train.config", "--limit-train"),
                                         ("train.config", "--limit-val")])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_limit_zero_and_negative_are_refused_alike(module, flag, value, tmp_path, capsys):
    """LIMIT=0 used to mean "all images" while LIMIT=-1 was refused: now both are refused; all = leave it out."""
    argv = ["--model", "t2t_vit_test", "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        _parser(module).parse_args(argv + [flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "leave it out for all" in err[0], err
    if flag == "--limit":
        assert "(make LIMIT=)" in err[0]
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(_parser(module).parse_args(argv), dest) is None  # left out: every image
    assert getattr(_parser(module).parse_args(argv + [flag, "5"]), dest) == 5


def test_limit_zero_through_make_is_one_line(tmp_path):
    r = subprocess.run(["make", "parity", f"DATA={tmp_path}", "LIMIT=0", f"OUT={tmp_path / 'out'}",
                        "MODEL=t2t_vit_test"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2
    assert "--limit (make LIMIT=) must be a whole number >= 1, got '0'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_library_limit_zero_is_refused_too(tmp_path):
    from train.data import scan_split
    from t2t_vit.data import DataError
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="positive"):
        scan_split(tmp_path, None, 0, seed=0)
    assert len(scan_split(tmp_path, None, None, seed=0)[0]) == 1


def _make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_make_passes_batch_size_and_limit_to_every_batching_stage():
    for target in ("validate", "onnx", "parity", "layers", "precision"):
        cmd = _make_n(target, "DATA=d", "CALIB_DATA=c", "BATCH_SIZE=7", "LIMIT=5")
        assert "--batch-size 7" in cmd, target
        if target in ("validate", "parity", "precision"):
            assert "--limit 5" in cmd, target
    assert "--batch-size 7" in _make_n("calib", "CALIB_DATA=c", "BATCH_SIZE=7")
    # Empty variables are not passed on: the stage's default batch, every image.
    cmd = _make_n("parity", "DATA=d", "BATCH_SIZE=", "LIMIT=")
    assert "--batch-size" not in cmd and "--limit" not in cmd


def test_onnx_with_bad_validation_data_writes_no_graph(tmp_path, capsys):
    """The validation images are read before the graphs are written: a bad --data leaves the folder as it was
    (no new, unvalidated graphs beside an older export report)."""
    from export import to_onnx

    out = tmp_path / "out"
    out.mkdir()
    (out / "t2t_vit_test.export.json").write_text("{}")  # an earlier export's report
    rc = to_onnx.main(["--model", "t2t_vit_test", "--out", str(out), "--data", str(tmp_path / "nope"),
                       "--val-images", "5", "--threads", "1"])
    assert rc == 2 and "data folder not found" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["t2t_vit_test.export.json"]
