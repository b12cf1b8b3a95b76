"""``make bench-busy``: conditions parse strictly, and a run records what each condition really used (speed
itself is a benchmark, not a test)."""
from __future__ import annotations

import json

import pytest

from studies import bench_busy
from t2t_vit.errors import T2TError


def test_conditions_parse():
    assert bench_busy.parse_condition("busy:all:passive", 4) == {"name": "busy:all:passive", "load": "busy",
                                                                   "threads": "4", "omp_passive": True}
    assert bench_busy.parse_condition("idle:auto", 4)["threads"] == "auto"
    for bad in ("noisy:auto", "busy", "busy:0", "busy:2:spin"):
        with pytest.raises(T2TError):
            bench_busy.parse_condition(bad, 4)


@pytest.mark.slow
def test_report_records_each_condition(tmp_path, monkeypatch):
    started = []
    real = bench_busy._spinner
    monkeypatch.setattr(bench_busy, "_spinner", lambda: started.append(real()) or started[-1])
    out = tmp_path / "reports"
    rc = bench_busy.main(["--conditions", "idle:auto,busy:1:passive", "--dataset", "digits", "--train-images", "64",
                          "--val-images", "32", "--settle", "0.2", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "bench-busy.json").read_text())
    idle, busy = report["rows"]
    assert (idle["load"], busy["load"]) == ("idle", "busy") and busy["omp_passive"]
    assert busy["threads_used"] == 1 and idle["threads_used"] >= 1  # what the training step really used
    assert idle["slowdown"] == pytest.approx(1.0) and busy["slowdown"] > 0 and idle["img_per_s"] > 0
    assert "OMP_WAIT_POLICY" in (out / "bench-busy.md").read_text() and (out / "bench-busy.png").is_file()
    assert report["baseline"] == "idle:auto" and report["dataset"] == "digits"
    # One competing process ran for the busy row only, and it is gone.
    assert len(started) == 1 and started[0].poll() is not None


def test_failed_demo_is_one_line_with_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("T2T_SHARED_DATA", str(tmp_path / "nowhere"))
    rc = bench_busy.main(["--conditions", "idle:1", "--dataset", "imagenette", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    log = tmp_path / "w" / "idle-1" / "bench-busy.log"
    assert str(log) in line and "Imagenette not found" in log.read_text()
    assert not (tmp_path / "r" / "bench-busy.json").exists()
