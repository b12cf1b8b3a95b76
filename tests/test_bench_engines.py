"""engines.bench: the timing loop, the TensorRT plan, report files, a baselines-only run on the tiny model,
and the trtexec sweep plumbing with a stand-in trtexec replaying a fixture log."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from engines import sidecar as S
from tests.engine_helpers import (INSTALL, LOGS, listing, make_test_sidecar, tiny_out)


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def test_time_runner_counts_calls():
    from engines.bench import time_runner

    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()

    class Slow:
        calls = 0

        def infer(self, x):
            self.calls += 1
            clock.t += 0.25

    r = Slow()
    times = time_runner(r, None, min_time_s=1.0, min_iters=2, warmup=3, clock=clock)
    assert r.calls == 3 + len(times)
    assert times == [0.25] * 4  # 4 x 0.25 s reaches min_time
    r2 = Slow()
    assert len(time_runner(r2, None, min_time_s=0.0, min_iters=5, warmup=0, clock=clock)) == 5


def test_plan_tensorrt_modes_without_trtexec(tmp_path, monkeypatch):
    from engines.bench import BenchError, plan_tensorrt

    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    engine = tmp_path / "m.fp16.engine"
    with pytest.raises(BenchError) as e:
        plan_tensorrt("require", engine)
    assert INSTALL in str(e.value) and "make bench-baselines" in str(e.value)
    plan = plan_tensorrt("auto", engine)
    assert not plan.run and "trtexec not found" in plan.reason and "not found (build it with `make engine`)" in plan.reason
    plan = plan_tensorrt("off", engine)
    assert not plan.run and plan.reason.startswith("disabled with --tensorrt off")
    assert listing(tmp_path) == []


FAKE_TRTEXEC = """#!{python}
import os, sys
if "--help" in sys.argv:
    print("&&&& RUNNING TensorRT.trtexec [TensorRT v101303] # trtexec --help")
    sys.exit(0)
text = open({log!r}).read().split("\\n", 1)[1]
print("&&&& RUNNING TensorRT.trtexec [TensorRT v101303] # " + " ".join(sys.argv))
print(text)
"""


def test_trtexec_sweep_plumbing_with_a_stand_in(tmp_path, monkeypatch):
    """A script replays the 10.x fixture log: checks commands, logs, rows; it measures nothing."""
    from engines.bench import BenchError, get_args_parser, plan_tensorrt, run_tensorrt

    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC.format(python=sys.executable, log=str(LOGS / "trt10_three_percentiles.log")))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    engine = tmp_path / "out" / "m.fp16.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"x")
    import hashlib

    S.write_sidecar(engine, make_test_sidecar(tensorrt_version="10.13.3.9",
                                              engine_sha256=hashlib.sha256(b"x").hexdigest(),
                                              profile={"input": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224],
                                                                 "max": [32, 3, 224, 224]}}))
    gpu = lambda: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}  # noqa: E731
    plan = plan_tensorrt("require", engine, str(fake), gpu=gpu)
    assert plan.run and plan.version == "10.13.3"
    args = get_args_parser().parse_args(["--model", "m", "--warmup-ms", "100", "--duration", "2", "--iterations", "10"])
    rows, runs = run_tensorrt(plan, [1, 32, 128], engine.parent, args)
    assert [r["batch"] for r in rows] == [1, 32]
    assert runs[2] == {"batch": 128, "skipped": "outside the engine profile [1, 32]"}
    for row, run in zip(rows, runs):
        assert "--useCudaGraph --noDataTransfers --useSpinWait" in run["command"]
        assert f"--shapes=input:{row['batch']}x3x224x224" in run["command"]
        assert "--warmUp=100 --duration=2 --iterations=10" in run["command"]
        assert row["images_per_s"] == pytest.approx(1523.77 * row["batch"])
        assert Path(run["log"]).is_file()
    # another GPU: refused with the rebuild hint, in auto mode as a reason
    other = plan_tensorrt("auto", engine, str(fake), gpu=lambda: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    assert not other.run and "make engine" in other.reason
    # an engine whose bytes changed after the build: refused before trtexec runs
    engine.write_bytes(b"y")
    with pytest.raises(BenchError, match="does not match its sidecar"):
        plan_tensorrt("require", engine, str(fake), gpu=gpu)


def _report(rows, ran=False):
    return {"tool": "engines.bench", "command": "python -m engines.bench --model t2t_vit_test",
            "created_utc": "2026-01-01T00:00:00+00:00", "model": "t2t_vit_test", "img_size": 64, "weights": "random",
            "host": {"cpu": "Test CPU", "cpu_cores": 2, "cpu_cores_usable": 2, "torch": "2.x", "torch_threads": 2,
                     "onnxruntime": "1.x", "onnx": "1.x", "gpu": None, "load_average": [0.1, 0.1, 0.1]},
            "tensorrt": {"ran": ran, "reason": "trtexec not found", "version": None, "runs": [], "sidecar": {}},
            "rows": rows, "skipped": [{"backend": "onnxruntime-cpu-int8", "reason": "x.int8.onnx not found"}]}


def test_report_files(tmp_path):
    from engines.bench import plot_report, render_markdown, report_stem
    from t2t_vit.reports import write_report

    rows = [{"backend": b, "precision": "fp32", "device": "cpu", "batch": n, "source": "runner",
             "latency_ms": {"min": n * k, "max": n * k, "mean": n * k, "median": n * k, "p90": n * k, "p95": n * k,
                            "p99": n * k},
             "gpu_compute_ms": None, "images_per_s": 1000.0 / k, "iterations": 3}
            for b, k in (("pytorch-cpu-fp32", 2.0), ("onnxruntime-cpu-fp32", 1.0)) for n in (1, 8)]
    report = _report(rows)
    stem = report_stem("t2t_vit_test", 64, report["host"], None)
    assert stem == "bench-engines-t2t_vit_test-64-cpu"
    assert report_stem("m", 224, {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "int8") == \
        "bench-engines-m-224-nvidia-h100-80gb-hbm3-trt-int8"
    (tmp_path / "r").mkdir()
    paths = write_report(tmp_path / "r" / stem, report, render_markdown(report), plot_report(report))
    assert sorted(p.name for p in paths) == sorted(f"{stem}.{e}" for e in ("json", "md", "png"))
    assert json.loads((tmp_path / "r" / f"{stem}.json").read_text())["rows"] == rows
    md = (tmp_path / "r" / f"{stem}.md").read_text()
    assert "The TensorRT part did not run**: trtexec not found" in md
    assert md.count("| pytorch-cpu-fp32 |") == 2 and "onnxruntime-cpu-int8: x.int8.onnx not found" in md
    assert (tmp_path / "r" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_bench_baselines_only_on_the_tiny_model(tmp_path, monkeypatch):
    """A real (small) run: ONNX Runtime CPU on a tiny ONNX and PyTorch CPU eager on t2t_vit_test."""
    from engines.bench import main

    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    out = tiny_out(tmp_path / "out")
    rc = main(["--model", "t2t_vit_test", "--out", str(out), "--tensorrt", "auto", "--batches", "1,2",
               "--backends", "onnxruntime-cpu,pytorch-cpu-fp32", "--min-time", "0", "--min-iters", "2", "--warmup", "1",
               "--report", f"{tmp_path / 'reports'}/", "--no-progress", "--threads", "1"])
    assert rc == 0
    stem = "bench-engines-t2t_vit_test-64-" + ("cpu" if not __import__("torch").cuda.is_available() else "")
    reports = sorted((tmp_path / "reports").glob("bench-engines-t2t_vit_test-64-*.json"))
    assert len(reports) == 1 and reports[0].name.startswith(stem)
    report = json.loads(reports[0].read_text())
    assert (out / reports[0].name).is_file()
    assert report["tensorrt"]["ran"] is False and "trtexec not found" in report["tensorrt"]["reason"]
    rows = {(r["backend"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("onnxruntime-cpu-fp32", 1), ("onnxruntime-cpu-fp32", 2),
                         ("pytorch-cpu-fp32", 1), ("pytorch-cpu-fp32", 2)}
    for (_, batch), r in rows.items():
        assert r["iterations"] >= 2
        assert r["images_per_s"] == pytest.approx(batch / (r["latency_ms"]["mean"] / 1e3))
        assert 0 < r["latency_ms"]["min"] <= r["latency_ms"]["median"] <= r["latency_ms"]["max"]
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "not found" in skipped["onnxruntime-cpu-fp16"] and "make calib" in skipped["onnxruntime-cpu-int8"]
    assert report["host"]["cpu"] and report["host"]["torch"]
    assert list(report["onnx_graphs"]) == ["fp32"]
    assert report["onnx_graphs"]["fp32"]["path"] == str(out / "t2t_vit_test.fp32.onnx")
    assert report["onnx_graphs"]["fp32"]["precision"] == "fp32"
