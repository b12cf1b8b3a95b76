"""fp8 as an engine precision: the plan and sidecar record what an fp8 engine needs (SM 8.9+, TensorRT >= 10.6),
the build (our code and Polygraphy's real loaders) against the recording stand-in for tensorrt as 10.x and 11.x,
and the refusals: a GPU below 8.9 or a TensorRT before 10.6 (the GPU's capability is monkeypatched: these test our
logic, no TensorRT ran and no engine was built), the runner on such a GPU, an fp8 graph where another precision
is expected (and the reverse), and the benchmark's fp8 rows (ONNX Runtime's emulation, said so in the row).

The fp8 graph is the real one of ``make calib PRECISION=fp8`` on t2t_vit_test (64 px, random weights, synthetic
calibration images), built as tests/test_fp8.py builds it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engines import build as B
from engines import sidecar as S
from engines import trt_compat as T
from tests.engine_helpers import REPO, data_meta, listing, make_test_sidecar, tiny_out, write_onnx
from tests.recording_trt import Recorder, install, make_recording_trt

pytestmark = pytest.mark.timeout(300)
MODEL = "t2t_vit_test"
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
FP8_NEEDS = T.EngineRequirements("8.9", "10.6")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder with make onnx's fp32/fp16 graphs and make calib PRECISION=fp8's graph of t2t_vit_test."""
    import onnx
    import torch

    import t2t_vit  # noqa: F401  (registers the models)
    from calibration.policy import DEFAULT_POLICY, Placement
    from calibration.quantize import TensorDataReader, build_qdq, ensure_opset
    from export.settings import ExportSettings
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model, trained_like_

    out = tmp_path_factory.mktemp("fp8-engine")
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    trained_like_(model)
    export_model(model, out, ExportSettings())
    fp32 = ensure_opset(onnx.load(str(out / f"{MODEL}.fp32.onnx")))
    fp16 = onnx.load(str(out / f"{MODEL}.fp16.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    build_qdq(fp32, Placement.from_model(fp32, DEFAULT_POLICY), "max", TensorDataReader(x),
              out / f"{MODEL}.fp8.onnx", fp16_model=fp16, cache=out / "ranges.json", qtype="fp8")
    return out


def _copy(made: Path, dest: Path, *names: str, rename: dict[str, str] | None = None) -> Path:
    """The named files of the fixture's folder (external weights included) in a folder of this test's own."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        for src in made.glob(f"{name}*"):
            shutil.copy(src, dest / (rename or {}).get(src.name, src.name))
    return dest


def _fake(monkeypatch, rec, gpu=H100, **kw):
    trt = make_recording_trt(rec, **kw)
    monkeypatch.setattr(B, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(B, "gpu_info", lambda: dict(gpu))
    install(monkeypatch, trt)
    return trt


# ----------------------------------------------------------------------------------------------------
# The plan (no TensorRT needed)
# ----------------------------------------------------------------------------------------------------
def test_plan_records_what_an_fp8_engine_needs(made):
    from t2t_vit.graphs import read_metadata

    plan = B.plan_build(MODEL, "fp8", made, B.BuildSettings())
    assert read_metadata(made / f"{MODEL}.fp8.onnx")["requires_compute_capability"] == "8.9"
    assert plan["requires_compute_capability"] == "8.9" and plan["requires_tensorrt"] == "10.6"
    assert plan["onnx"] == str(made / f"{MODEL}.fp8.onnx") and plan["engine"] == str(made / f"{MODEL}.fp8.engine")
    for precision in ("fp32", "fp16"):  # no requirement beyond any strongly typed build
        other = B.plan_build(MODEL, precision, made, B.BuildSettings())
        assert other["requires_compute_capability"] is None and other["requires_tensorrt"] is None


def test_dry_run_prints_the_fp8_requirements(made, tmp_path):
    out = _copy(made, tmp_path / "out", f"{MODEL}.fp8.onnx")
    proc = subprocess.run([sys.executable, "-m", "engines.build", "--model", MODEL, "--out", str(out), "--precision",
                           "fp8", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["requires_compute_capability"], plan["requires_tensorrt"]) == ("8.9", "10.6")


def test_fp8_graph_where_int8_is_expected_is_refused(made, tmp_path):
    out = _copy(made, tmp_path / "out", f"{MODEL}.fp8.onnx", rename={f"{MODEL}.fp8.onnx": f"{MODEL}.int8.onnx"})
    before = listing(tmp_path)
    for cmd in (["engines.build", "--precision", "int8", "--dry-run"],
                ["engines.bench", "--precision", "int8", "--tensorrt", "off", "--backends", "onnxruntime-cpu-int8",
                 "--batches", "1", "--no-progress"]):
        proc = subprocess.run([sys.executable, "-m", *cmd, "--model", MODEL, "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{cmd[0]}: error: ") and "Traceback" not in proc.stderr
        assert "is a fp8 graph (metadata precision), not the int8 graph expected here" in last
        assert "make calib MODEL=t2t_vit_test" in last
    assert listing(tmp_path) == before


def test_other_graph_where_fp8_is_expected_is_refused(tmp_path):
    out = tiny_out(tmp_path, precision="int8")
    (out / f"{MODEL}.int8.onnx").rename(out / f"{MODEL}.fp8.onnx")
    with pytest.raises(B.BuildError, match="is a int8 graph .* not the fp8 graph expected here.*PRECISION=fp8"):
        B.plan_build(MODEL, "fp8", out, B.BuildSettings())


def test_fp8_graph_without_its_compute_capability_is_refused(tmp_path):
    # Not written by make calib: fp8 by its metadata, but without the GPU requirement the engine must record.
    write_onnx(tmp_path / f"{MODEL}.fp8.onnx", metadata={"model": MODEL, "precision": "fp8",
                                                         "qdq_dtype": "float8e4m3fn", **data_meta(64)})
    with pytest.raises(B.BuildError, match="lacks requires_compute_capability.*make calib PRECISION=fp8"):
        B.plan_build(MODEL, "fp8", tmp_path, B.BuildSettings())


@pytest.mark.parametrize("meta,expect", [
    ({"precision": "fp8", "requires_compute_capability": "8.9"}, ("8.9", "10.6")),
    ({"precision": "int8", "qdq_dtype": "float8e4m3fn", "requires_compute_capability": "8.9"}, ("8.9", "10.6")),
    ({"precision": "int8", "qdq_dtype": "int8"}, (None, None)),
    ({"precision": "fp16"}, (None, None)),
])
def test_requirements_from_metadata(meta, expect):
    req = T.EngineRequirements.from_metadata(meta)
    assert (req.compute_capability, req.tensorrt) == expect
    with pytest.raises(ValueError, match="not major.minor"):
        T.EngineRequirements.from_metadata({**meta, "requires_compute_capability": "sm89"})


@pytest.mark.parametrize("cc,ok", [("8.6", False), ("8.0", False), ("7.5", False), ("8.9", True), ("9.0", True),
                                   ("10.0", True), ("12.0", True)])
def test_capability_is_compared_as_numbers(cc, ok):
    # "10.0" and "12.0" (Blackwell) sort below "8.9" as strings
    problems = FP8_NEEDS.problems(gpu={"name": "GPU", "compute_capability": cc})
    assert (not problems) == ok


# ----------------------------------------------------------------------------------------------------
# The build against the recording stand-in (it builds nothing: this checks our wiring, not TensorRT)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,flags", [("10.13.3.9", 1 << 3), ("11.4.0.106", 0)])
def test_fp8_build_wiring_and_sidecar(made, tmp_path, monkeypatch, version, flags):
    out = _copy(made, tmp_path / "out", f"{MODEL}.fp8.onnx", f"{MODEL}.fp32.onnx")
    rec = Recorder()
    _fake(monkeypatch, rec, version=version)
    settings = B.BuildSettings(1, 4, 8, timing_cache=str(tmp_path / "t.cache"))
    side = B.build_engine(MODEL, "fp8", out, settings)
    engine = out / f"{MODEL}.fp8.engine"
    assert engine.read_bytes() == b"FAKE-ENGINE"
    assert ("parse_from_file", str(out / f"{MODEL}.fp8.onnx")) in rec.calls
    assert ("create_network", flags) in rec.calls  # strongly typed: the enum's bit on 10.x, nothing on 11.x
    # precision is the graph's: no FP8 (or any precision) builder flag, only TF32 cleared
    assert [c for c in rec.calls if c[0] in ("set_flag", "clear_flag")] == [("clear_flag", "TF32")]
    assert not rec.names - (T.TRT_NAMES_USED | T.TRT_NAMES_VIA_POLYGRAPHY)  # nothing the names test misses
    on_disk = S.read_sidecar(engine)
    assert on_disk == json.loads(json.dumps(side))
    assert on_disk["precision"] == "fp8" and on_disk["tensorrt_version"] == version
    assert on_disk["requires_compute_capability"] == "8.9" and on_disk["requires_tensorrt"] == "10.6"
    assert on_disk["onnx_metadata"]["qdq_dtype"] == "float8e4m3fn"
    assert on_disk["onnx_sha256"] == hashlib.sha256((out / f"{MODEL}.fp8.onnx").read_bytes()).hexdigest()
    # the fp32 engine of the same export records no requirement
    fp32 = B.build_engine(MODEL, "fp32", out, settings)
    assert fp32["requires_compute_capability"] is None and fp32["requires_tensorrt"] is None


@pytest.mark.parametrize("gpu,version,expect", [
    ({"name": "NVIDIA A10", "compute_capability": "8.6"}, "10.13.3.9",
     ["needs a GPU of compute capability 8.9 or later", "this NVIDIA A10 has 8.6", "make engine PRECISION=int8"]),
    (A100, "11.4.0.106", ["compute capability 8.9 or later", "has 8.0"]),
    (H100, "10.5.0.18", ["needs TensorRT >= 10.6, this is TensorRT 10.5.0.18", "tensorrt>=10.6"]),
    (A100, "10.3.0.26", ["needs TensorRT >= 10.6", "has 8.0"]),
])
def test_fp8_build_refuses_what_cannot_run_it_and_writes_nothing(made, tmp_path, monkeypatch, capsys, gpu, version,
                                                                 expect):
    out = _copy(made, tmp_path / "out", f"{MODEL}.fp8.onnx")
    rec = Recorder()
    _fake(monkeypatch, rec, gpu=gpu, version=version)
    before = listing(tmp_path)
    rc = B.main(["--model", MODEL, "--out", str(out), "--precision", "fp8",
                 "--engine", str(tmp_path / "e" / "x.engine"), "--timing-cache", str(tmp_path / "c" / "t.cache")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("engines.build:")]
    assert len(lines) == 1 and lines[0].startswith("engines.build: error: ") and "Traceback" not in err
    for text in expect:
        assert text in lines[0]
    assert listing(tmp_path) == before  # no engine, sidecar, timing cache or folder
    assert not [c for c in rec.calls if c[0] in ("create_network", "OnnxParser", "build_serialized_network")]
    # the one build function refuses too (make layers builds through it)
    shapes = B.profile_shapes({"input": ["batch", 3, 64, 64]}, B.BuildSettings(1, 1, 1))
    with pytest.raises(T.UnsupportedPlatform):
        B.build_serialized_engine(out / f"{MODEL}.fp8.onnx", shapes, B.BuildSettings(1, 1, 1))
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# The runner: an fp8 engine on a GPU below its requirement is refused before deserialization
# ----------------------------------------------------------------------------------------------------
def _engine(tmp_path, precision, **over):
    engine = tmp_path / f"m.{precision}.engine"
    engine.write_bytes(b"engine bytes")
    S.write_sidecar(engine, make_test_sidecar(precision=precision, engine_sha256=hashlib.sha256(b"engine bytes")
                                              .hexdigest(), **over))
    return engine


@pytest.mark.parametrize("check", [True, False])
def test_runner_refuses_fp8_engine_below_its_compute_capability(tmp_path, monkeypatch, check):
    import engines.trt_runtime as R

    engine = _engine(tmp_path, "fp8", requirements=FP8_NEEDS)
    assert S.read_sidecar(engine)["requires_compute_capability"] == "8.9"
    # The stand-in has no Logger: getting past the checks shows as AttributeError at deserialization.
    monkeypatch.setattr(R, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.13.3.9"))
    monkeypatch.setattr(R, "gpu_info", lambda: dict(A100))
    runner = R.TensorRTRunner(engine, check=check)
    with pytest.raises(T.UnsupportedPlatform, match=r"m\.fp8\.engine \(fp8 engine\) needs a GPU of compute "
                                                    r"capability 8\.9 or later .* this NVIDIA A100-SXM4-80GB has 8\.0"):
        with runner:
            pass
    assert not runner.is_active
    # on the GPU it was built for the requirement holds, and the runner goes on to deserialize
    monkeypatch.setattr(R, "gpu_info", lambda: dict(H100))
    with pytest.raises(AttributeError, match="Logger"):
        with R.TensorRTRunner(engine, check=check):
            pass


def test_runner_int8_engine_has_no_requirement(tmp_path, monkeypatch):
    import engines.trt_runtime as R

    engine = _engine(tmp_path, "int8")
    assert S.read_sidecar(engine)["requires_compute_capability"] is None
    monkeypatch.setattr(R, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.13.3.9"))
    monkeypatch.setattr(R, "gpu_info", lambda: dict(A100))
    with pytest.raises(AttributeError, match="Logger"):  # check=False: only the requirement is checked
        with R.TensorRTRunner(engine, check=False):
            pass
    # a sidecar written before requirements were recorded reads as none
    data = json.loads(S.sidecar_path(engine).read_text())
    data.pop("requires_compute_capability")
    data.pop("requires_tensorrt")
    S.sidecar_path(engine).write_text(json.dumps(data))
    S.check_requirements(S.read_sidecar(engine), gpu=A100)


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------
def test_bench_plan_checks_fp8_engine_precision_and_gpu(tmp_path):
    from engines.bench import BenchError, plan_tensorrt
    from tests.engine_helpers import LOGS
    from tests.test_bench_engines import FAKE_TRTEXEC

    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC.format(python=sys.executable, log=str(LOGS / "trt10_three_percentiles.log")))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    engine = _engine(tmp_path, "fp8", requirements=FP8_NEEDS)
    plan = plan_tensorrt("require", engine, str(fake), gpu=lambda: dict(H100), precision="fp8")
    assert plan.run and plan.sidecar["requires_compute_capability"] == "8.9"
    below = plan_tensorrt("auto", engine, str(fake), gpu=lambda: dict(A100), precision="fp8")
    assert not below.run and "needs a GPU of compute capability 8.9 or later" in below.reason
    with pytest.raises(BenchError, match="is a fp8 engine .*not the int8 engine asked for"):
        plan_tensorrt("require", engine, str(fake), gpu=lambda: dict(H100), precision="int8")


def test_bench_times_the_fp8_graph_as_an_emulation(made, tmp_path, monkeypatch):
    from engines.bench import EMULATED, main

    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    out = _copy(made, tmp_path / "out", f"{MODEL}.fp8.onnx")
    rc = main(["--model", MODEL, "--out", str(out), "--precision", "fp8", "--tensorrt", "auto", "--batches", "1,2",
               "--backends", "onnxruntime-cpu-fp8", "--min-time", "0", "--min-iters", "2", "--warmup", "1",
               "--no-progress", "--threads", "1"])
    assert rc == 0
    (path,) = out.glob("bench-engines-t2t_vit_test-64-*.json")
    report = json.loads(path.read_text())
    assert report["tensorrt"]["precision"] == "fp8" and not report["tensorrt"]["ran"]
    assert "t2t_vit_test.fp8.engine not found" in report["tensorrt"]["reason"]
    rows = report["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("onnxruntime-cpu-fp8", 1), ("onnxruntime-cpu-fp8", 2)]
    assert all(r["precision"] == "fp8" and r["emulated"] == EMULATED["fp8"] for r in rows)
    assert report["onnx_graphs"]["fp8"]["precision"] == "fp8"
    md = path.with_suffix(".md").read_text()
    assert md.count("| onnxruntime-cpu-fp8 | fp8 (emulated) |") == 2
    assert "(emulated): ONNX Runtime emulates FP8" in md
