"""engines/: everything around TensorRT that runs without it, plus the TensorRT/GPU tier (skipped here).

* trt_compat: the strongly typed flag per TensorRT version (fake ``trt`` module objects stand in for
  10.x/11.x to check our choice, not TensorRT), version parsing, the not-installed error.
* sidecar: round trip and refusal of another TensorRT version / GPU / engine file.
* build: the plan from a small ONNX (shapes, data config, errors), the builder wiring against a
  recording stand-in (it produces no engine), and the no-TensorRT failure mode that writes nothing.
* trt_runtime: construction from a sidecar, batch splitting, availability.
* bench: statistics against numpy, the timing loop, the TensorRT plan, report files, a baselines-only
  run on the tiny model, and the trtexec sweep plumbing with a stand-in trtexec replaying a fixture log.
"""
from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import json
import os
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
from engines import trt_compat as C

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "tests" / "data" / "trtexec"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the no-TensorRT failure mode cannot be observed")
INSTALL = "pip install -e '.[tensorrt]'"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------
# Small ONNX graphs (onnx.helper; ONNX Runtime can run them)
# ----------------------------------------------------------------------------------------------------
def data_meta(img_size: int = 64) -> dict[str, str]:
    from t2t_vit.data import DataConfig

    return DataConfig(img_size=img_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).to_metadata()


def write_onnx(path: Path, *, batch="batch", size: int | str = 64, metadata: dict | None = None) -> Path:
    """input (N,3,H,W) float32 -> GlobalAveragePool -> Flatten -> logits (N,3)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_out(tmp_path: Path, model="t2t_vit_test", precision="fp32", **kw) -> Path:
    meta = {"model": model, "precision": precision, "num_classes": "3", **data_meta(64)}
    write_onnx(tmp_path / f"{model}.{precision}.onnx", metadata=meta, **kw)
    return tmp_path


# ----------------------------------------------------------------------------------------------------
# trt_compat
# ----------------------------------------------------------------------------------------------------
def fake_trt(version: str, strongly_typed_value: int | None):
    """A module-like object with just what network_creation_flags reads."""
    members = {"EXPLICIT_BATCH": 0} if strongly_typed_value is None else {"STRONGLY_TYPED": strongly_typed_value}
    return types.SimpleNamespace(__version__=version,
                                 NetworkDefinitionCreationFlag=enum.IntEnum("NetworkDefinitionCreationFlag", members))


@pytest.mark.parametrize("value", [0, 1, 5])
def test_strongly_typed_flag_on_10_comes_from_the_enum(value):
    assert C.network_creation_flags(fake_trt("10.13.3.9", value)) == 1 << value


@pytest.mark.parametrize("version,value", [("11.4.0.106", 1), ("11.0.0", None)])
def test_strongly_typed_is_default_on_11(version, value):
    # 11 keeps a deprecated, ignored STRONGLY_TYPED member (or none at all): no flag is passed either way.
    assert C.network_creation_flags(fake_trt(version, value)) == 0


def test_missing_flag_on_old_tensorrt_is_an_error():
    with pytest.raises(C.TensorRTUnavailable, match="STRONGLY_TYPED"):
        C.network_creation_flags(fake_trt("9.0.1", None))


@pytest.mark.parametrize("text,expect", [("10.13.3.9", (10, 13, 3, 9)), ("11.4.0.106", (11, 4, 0, 106)),
                                         ("10.1.0.post12.dev1", (10, 1, 0, 12)), ("8.6.1", (8, 6, 1))])
def test_parse_version(text, expect):
    assert C.parse_version(text) == expect


@no_trt
def test_import_tensorrt_names_what_to_install():
    with pytest.raises(C.TensorRTUnavailable, match=r"pip install -e '\.\[tensorrt\]'"):
        C.import_tensorrt()
    ok, why = C.tensorrt_availability()
    assert not ok and INSTALL in why


def test_import_tensorrt_rejects_too_old(monkeypatch):
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "8.6.1"
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    with pytest.raises(C.TensorRTUnavailable, match="too old"):
        C.import_tensorrt(need_gpu=False)
    mod.__version__ = "10.13.3.9"
    assert C.import_tensorrt(need_gpu=False) is mod


# ----------------------------------------------------------------------------------------------------
# sidecar
# ----------------------------------------------------------------------------------------------------
def make_test_sidecar(**over) -> dict:
    kw = dict(model="t2t_vit_12", precision="fp16",
              profile={"input": {"min": [1, 3, 224, 224], "opt": [32, 3, 224, 224], "max": [128, 3, 224, 224]}},
              onnx_path="artifacts/t2t_vit_12/t2t_vit_12.fp16.onnx", onnx_sha256="a" * 64, engine_sha256="b" * 64,
              tensorrt_version="10.13.3.9", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
              build_time_s=12.3456, built_at="2026-01-01T00:00:00+00:00", onnx_metadata={"model": "t2t_vit_12"},
              data_config=data_meta(224), builder={"opt_level": 3})
    kw.update(over)
    return S.make_sidecar(**kw)


def test_sidecar_round_trip_and_match(tmp_path):
    engine = tmp_path / "m.fp16.engine"
    S.write_sidecar(engine, make_test_sidecar())
    assert S.sidecar_path(engine) == tmp_path / "m.fp16.engine.json"
    got = S.read_sidecar(engine)
    assert got["profile"]["input"]["max"] == [128, 3, 224, 224]
    assert got["onnx"] == "t2t_vit_12.fp16.onnx" and got["build_time_s"] == 12.346
    assert S.data_config_from_sidecar(got).img_size == 224
    S.check_sidecar(got, tensorrt_version="10.13.3.9", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                    engine_sha256="b" * 64)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("running,expect", [
    (dict(tensorrt_version="11.4.0.106"), "built with TensorRT 10.13.3.9, running TensorRT 11.4.0.106"),
    (dict(tensorrt_version="10.13.2.6"), "running TensorRT 10.13.2.6"),
    (dict(gpu_name="NVIDIA H200"), "built on a NVIDIA H100 80GB HBM3, running on a NVIDIA H200"),
    (dict(compute_capability="8.9", gpu_name="NVIDIA L4"), "compute capability 9.0, this GPU has 8.9"),
])
def test_sidecar_refuses_other_tensorrt_or_gpu(running, expect):
    args = dict(tensorrt_version="10.13.3.9", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    args.update(running)
    with pytest.raises(S.EngineMismatchError) as e:
        S.check_sidecar(make_test_sidecar(), engine_path="x.engine", **args)
    msg = str(e.value)
    assert expect in msg
    assert "make engine MODEL=t2t_vit_12 PRECISION=fp16" in msg and msg.startswith("x.engine")


def test_sidecar_lists_every_mismatch_and_checks_the_engine_file():
    with pytest.raises(S.EngineMismatchError) as e:
        S.check_sidecar(make_test_sidecar(), tensorrt_version="11.4.0.106", gpu_name="NVIDIA L4",
                        compute_capability="8.9")
    assert str(e.value).count(";") >= 2
    with pytest.raises(S.EngineMismatchError, match="replaced or damaged"):
        S.check_sidecar(make_test_sidecar(), tensorrt_version="10.13.3.9", gpu_name="NVIDIA H100 80GB HBM3",
                        compute_capability="9.0", engine_sha256="c" * 64)


def test_sidecar_missing_or_broken(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(S.SidecarError, match="make engine"):
        S.read_sidecar(engine)
    S.sidecar_path(engine).write_text("{not json")
    with pytest.raises(S.SidecarError, match="not valid JSON"):
        S.read_sidecar(engine)
    S.sidecar_path(engine).write_text(json.dumps({"format": 1, "model": "m"}))
    with pytest.raises(S.SidecarError, match="lacks"):
        S.read_sidecar(engine)
    S.sidecar_path(engine).write_text(json.dumps({**make_test_sidecar(), "format": 99}))
    with pytest.raises(S.SidecarError, match="format 99"):
        S.read_sidecar(engine)


# ----------------------------------------------------------------------------------------------------
# build: the plan (no TensorRT needed)
# ----------------------------------------------------------------------------------------------------
def test_plan_build_shapes_and_data_config(tmp_path):
    out = tiny_out(tmp_path)
    plan = B.plan_build("t2t_vit_test", "fp32", out, B.BuildSettings(min_batch=2, opt_batch=8, max_batch=16))
    assert plan["onnx"] == str(out / "t2t_vit_test.fp32.onnx")
    assert plan["engine"] == str(out / "t2t_vit_test.fp32.engine")
    assert plan["sidecar"] == str(out / "t2t_vit_test.fp32.engine.json")
    assert plan["profile"] == {"input": {"min": [2, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [16, 3, 64, 64]}}
    assert plan["data_config"] == data_meta(64)
    default = B.plan_build("t2t_vit_test", "fp32", out, B.BuildSettings())
    assert [default["profile"]["input"][k][0] for k in ("min", "opt", "max")] == [1, 32, 128]


@pytest.mark.parametrize("precision,hint", [("fp16", "make onnx"), ("int8", "make calib")])
def test_plan_build_missing_onnx_says_how_to_make_it(tmp_path, precision, hint):
    with pytest.raises(B.BuildError, match=hint):
        B.plan_build("t2t_vit_test", precision, tmp_path, B.BuildSettings())


def test_plan_build_rejects_disagreeing_graphs(tmp_path):
    out = tiny_out(tmp_path, precision="fp16")
    (out / "t2t_vit_test.fp16.onnx").rename(out / "t2t_vit_test.int8.onnx")
    with pytest.raises(B.BuildError, match="is a fp16 graph"):
        B.plan_build("t2t_vit_test", "int8", out, B.BuildSettings())
    write_onnx(tmp_path / "nometa" / "t2t_vit_test.fp32.onnx", metadata={"precision": "fp32"})
    with pytest.raises(B.BuildError, match="re-export"):
        B.plan_build("t2t_vit_test", "fp32", tmp_path / "nometa", B.BuildSettings())
    with pytest.raises(B.BuildError, match="holds t2t_vit_test"):
        B.plan_build("t2t_vit_7", "fp32", tmp_path / "x", B.BuildSettings(), onnx_path=tiny_out(tmp_path / "y") /
                     "t2t_vit_test.fp32.onnx")


def test_profile_shapes_errors():
    ok = {"input": ["batch", 3, 64, 64]}
    with pytest.raises(B.BuildError, match="min <= opt <= max"):
        B.profile_shapes(ok, B.BuildSettings(min_batch=8, opt_batch=4, max_batch=16))
    with pytest.raises(B.BuildError, match="0..5"):
        B.profile_shapes(ok, B.BuildSettings(opt_level=6))
    with pytest.raises(B.BuildError, match="axis 2 is dynamic"):
        B.profile_shapes({"input": ["batch", 3, "h", 64]}, B.BuildSettings())
    with pytest.raises(B.BuildError, match="static batch of 1"):
        B.profile_shapes({"input": [1, 3, 64, 64]}, B.BuildSettings())
    assert B.profile_shapes({"input": [4, 3, 64, 64]}, B.BuildSettings(4, 4, 4))["input"]["max"] == [4, 3, 64, 64]
    with pytest.raises(B.BuildError, match="--img-size is 224"):
        B.profile_shapes(ok, B.BuildSettings(), img_size=224)


def test_plan_build_checks_checkpoint_hash(tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    import hashlib

    meta = {"model": "t2t_vit_test", "precision": "fp32", **data_meta(64),
            "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest()}
    write_onnx(tmp_path / "t2t_vit_test.fp32.onnx", metadata=meta)
    B.plan_build("t2t_vit_test", "fp32", tmp_path, B.BuildSettings(), checkpoint=ckpt)
    ckpt.write_bytes(b"other weights")
    with pytest.raises(B.BuildError, match="another checkpoint"):
        B.plan_build("t2t_vit_test", "fp32", tmp_path, B.BuildSettings(), checkpoint=ckpt)


def test_build_dry_run_needs_no_tensorrt_and_writes_nothing(tmp_path, capsys):
    out = tiny_out(tmp_path)
    before = listing(out)
    assert B.main(["--model", "t2t_vit_test", "--out", str(out), "--precision", "fp32", "--max-batch", "64",
                   "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"]["input"]["max"] == [64, 3, 64, 64]
    assert listing(out) == before


# ----------------------------------------------------------------------------------------------------
# build: without TensorRT nothing is written
# ----------------------------------------------------------------------------------------------------
@no_trt
def test_build_without_tensorrt_stops_and_writes_nothing(tmp_path, capsys):
    out = tiny_out(tmp_path)
    before = listing(out)
    rc = B.main(["--model", "t2t_vit_test", "--out", str(out), "--precision", "fp32",
                 "--timing-cache", str(tmp_path / "cache" / "t.cache")])
    err = capsys.readouterr().err
    assert rc == 2
    assert INSTALL in err and "nothing was written" in err
    assert listing(out) == before
    # stops before looking at its input: a missing ONNX is not even reported
    rc = B.main(["--model", "t2t_vit_test", "--out", str(tmp_path / "absent"), "--precision", "fp16"])
    assert rc == 2 and INSTALL in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


@no_trt
@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("target", ["engine", "bench"])
def test_make_targets_without_tensorrt(tmp_path, target):
    out = tiny_out(tmp_path / "out")
    before = listing(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # no trtexec on PATH
    env.pop("TRTEXEC", None)
    proc = subprocess.run(["make", "-s", target, "MODEL=t2t_vit_test", f"OUT={out}", "PRECISION=fp32",
                           f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert INSTALL in proc.stderr, proc.stderr
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# build: the builder wiring, against a recording stand-in for the tensorrt module (no engine is built)
# ----------------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.calls: list[tuple] = []


class _Strict:
    """Raises on any attribute our code is not expected to touch (e.g. set_flag, int8_calibrator)."""

    def __getattr__(self, name):
        raise AssertionError(f"unexpected TensorRT API use: {type(self).__name__}.{name}")


class _FakeCache(_Strict):
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data


def make_recording_trt(rec: _Recorder, version="10.13.3.9", input_name="input", serialized=b"FAKE-ENGINE"):
    class Flag(enum.IntEnum):
        STRONGLY_TYPED = 3

    class Tensor(_Strict):
        name = input_name

    class Network(_Strict):
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class Parser(_Strict):
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse_from_file", path))
            return True

    class Profile(_Strict):
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

    class Config(_Strict):
        def __init__(self):
            self._cache = None

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("set_memory_pool_limit", pool, size))

        def __setattr__(self, name, value):
            if name == "builder_optimization_level":
                rec.calls.append(("builder_optimization_level", value))
            elif name != "_cache":
                raise AssertionError(f"unexpected config attribute {name}")
            object.__setattr__(self, name, value)

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_optimization_profile",))

        def create_timing_cache(self, data):
            rec.calls.append(("create_timing_cache", bytes(data)))
            return _FakeCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_timing_cache", ignore_mismatch))
            self._cache = cache
            return True

        def get_timing_cache(self):
            return _FakeCache(self._cache.data + b"+timings")

    class Builder(_Strict):
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build_serialized_network",))
            return serialized

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=Flag, Logger=Logger,
                                 Builder=Builder, OnnxParser=Parser,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


def test_build_wiring_with_recording_stand_in(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(B, "import_tensorrt", lambda: make_recording_trt(rec))
    monkeypatch.setattr(B, "gpu_info", lambda: {"name": "Test GPU", "compute_capability": "9.0"})
    out = tiny_out(tmp_path / "out")
    cache = tmp_path / "cache" / "timing.cache"
    settings = B.BuildSettings(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256, opt_level=5,
                               timing_cache=str(cache))
    side = B.build_engine("t2t_vit_test", "fp32", out, settings)

    engine = out / "t2t_vit_test.fp32.engine"
    assert engine.read_bytes() == b"FAKE-ENGINE"
    calls = rec.calls
    assert ("create_network", 1 << 3) in calls  # the enum member's bit, on 10.x
    assert ("set_memory_pool_limit", "WORKSPACE", 256 * 2**20) in calls
    assert ("builder_optimization_level", 5) in calls
    assert ("set_shape", "input", [1, 3, 64, 64], [4, 3, 64, 64], [8, 3, 64, 64]) in calls
    assert ("set_timing_cache", False) in calls and ("create_timing_cache", b"") in calls
    assert cache.read_bytes() == b"+timings"
    # the sidecar describes this build
    on_disk = S.read_sidecar(engine)
    assert on_disk == json.loads(json.dumps(side))
    import hashlib

    assert on_disk["engine_sha256"] == hashlib.sha256(b"FAKE-ENGINE").hexdigest()
    assert on_disk["onnx_sha256"] == hashlib.sha256((out / "t2t_vit_test.fp32.onnx").read_bytes()).hexdigest()
    assert on_disk["gpu"] == {"name": "Test GPU", "compute_capability": "9.0"}
    assert on_disk["tensorrt_version"] == "10.13.3.9"
    assert on_disk["builder"]["workspace_mib"] == 256 and on_disk["builder"]["network_creation_flags"] == 8
    assert on_disk["data_config"] == data_meta(64)
    assert on_disk["profile"]["input"]["opt"] == [4, 3, 64, 64]

    # a second build (here on "11.x": no creation flag) starts from the saved timing cache
    rec2 = _Recorder()
    monkeypatch.setattr(B, "import_tensorrt", lambda: make_recording_trt(rec2, version="11.4.0.106"))
    B.build_engine("t2t_vit_test", "fp32", out, settings)
    assert ("create_timing_cache", b"+timings") in rec2.calls
    assert ("create_network", 0) in rec2.calls
    assert cache.read_bytes() == b"+timings+timings"
    assert not [p for p in out.rglob("*.tmp")]


def test_failed_build_writes_nothing(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(B, "import_tensorrt", lambda: make_recording_trt(rec, serialized=None))
    monkeypatch.setattr(B, "gpu_info", lambda: {"name": "Test GPU", "compute_capability": "9.0"})
    out = tiny_out(tmp_path / "out")
    before = listing(tmp_path)
    with pytest.raises(B.BuildError, match="failed to build"):
        B.build_engine("t2t_vit_test", "fp32", out, B.BuildSettings(timing_cache=str(tmp_path / "c" / "t.cache")))
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# trt_runtime
# ----------------------------------------------------------------------------------------------------
def test_batch_chunks():
    from engines.trt_runtime import batch_chunks

    for n, hi in [(1, 128), (128, 128), (129, 128), (300, 7), (0, 4)]:
        chunks = batch_chunks(n, hi)
        assert sum(b - a for a, b in chunks) == n
        assert all(0 < b - a <= hi for a, b in chunks)
        assert [a for a, _ in chunks] == list(range(0, n, hi))
    with pytest.raises(ValueError):
        batch_chunks(3, 0)


def test_tensorrt_runner_reads_sidecar_without_touching_a_device(tmp_path):
    from engines.runners import Runner
    from engines.trt_runtime import TensorRTRunner

    engine = tmp_path / "m.int8.engine"
    with pytest.raises(Exception, match="make engine"):
        TensorRTRunner(engine)
    engine.write_bytes(b"not an engine")
    with pytest.raises(S.SidecarError):
        TensorRTRunner(engine)
    S.write_sidecar(engine, make_test_sidecar(precision="int8"))
    runner = TensorRTRunner(engine)
    assert isinstance(runner, Runner)
    assert runner.name == "tensorrt-int8" and runner.precision == "int8"
    assert runner.data_config.img_size == 224
    assert not runner.is_active
    ok, why = TensorRTRunner.availability()
    assert ok == (HAS_TRT and __import__("torch").cuda.is_available())
    if not ok:
        assert why
        with pytest.raises(C.TensorRTUnavailable):
            with runner:
                pass
        assert not runner.is_active


def test_tensorrt_runner_batches_stay_inside_the_profile(tmp_path):
    # No device: _run is replaced by a stand-in that enforces the profile like set_input_shape would.
    import torch

    from engines.runners import RunnerError
    from engines.trt_runtime import TensorRTRunner

    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(b"engine bytes")
    S.write_sidecar(engine, make_test_sidecar())
    runner = TensorRTRunner(engine)
    runner._batch_range = (4, 8)
    seen = []

    def run(x):
        assert 4 <= x.shape[0] <= 8, x.shape
        seen.append(x.shape[0])
        return x.reshape(x.shape[0], -1)[:, :2].numpy() * 2

    runner._run = run
    images = torch.arange(11 * 3 * 2 * 2, dtype=torch.float32).reshape(11, 3, 2, 2)
    got = runner._infer(images)
    np.testing.assert_array_equal(got, images.reshape(11, -1)[:, :2].numpy() * 2)
    assert seen == [8, 4]  # 11 = 8 + 3, and the short tail reruns the last 4 images
    with pytest.raises(RunnerError, match="below the engine profile's minimum 4"):
        runner._infer(images[:3])


@pytest.mark.parametrize("running_trt,running_gpu,expect", [
    ("11.4.0.106", "NVIDIA H100 80GB HBM3", "running TensorRT 11.4.0.106"),
    ("10.13.3.9", "NVIDIA H200", "running on a NVIDIA H200"),
    ("10.13.3.9", "NVIDIA H100 80GB HBM3", "replaced or damaged"),  # engine bytes differ from the sidecar's
])
def test_tensorrt_runner_refuses_mismatch_before_deserializing(tmp_path, monkeypatch, running_trt, running_gpu, expect):
    import engines.trt_runtime as R

    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(b"engine bytes")
    S.write_sidecar(engine, make_test_sidecar())  # engine_sha256 "b"*64 does not match these bytes
    # The stand-in has no Runtime: reaching deserialization would raise AttributeError, not the mismatch.
    monkeypatch.setattr(R, "import_tensorrt", lambda: types.SimpleNamespace(__version__=running_trt))
    monkeypatch.setattr(R, "gpu_info", lambda: {"name": running_gpu, "compute_capability": "9.0"})
    runner = R.TensorRTRunner(engine)
    with pytest.raises(S.EngineMismatchError, match=expect):
        with runner:
            pass
    assert not runner.is_active


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def test_latency_stats_against_numpy():
    from engines.bench import latency_stats

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        secs = rng.uniform(0.001, 0.01, size=n)
        st = latency_stats(list(secs))
        ms = secs * 1e3
        assert st["min"] == pytest.approx(ms.min()) and st["max"] == pytest.approx(ms.max())
        assert st["mean"] == pytest.approx(ms.mean()) and st["median"] == pytest.approx(np.median(ms))
        for p in (90, 95, 99):
            assert st[f"p{p}"] == pytest.approx(np.percentile(ms, p))
    with pytest.raises(ValueError):
        latency_stats([])


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
    from engines.bench import get_args_parser, plan_tensorrt, run_tensorrt

    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC.format(python=sys.executable, log=str(LOGS / "trt10_three_percentiles.log")))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    engine = tmp_path / "out" / "m.fp16.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"x")
    S.write_sidecar(engine, make_test_sidecar(tensorrt_version="10.13.3.9",
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


def _report(rows, ran=False):
    return {"model": "t2t_vit_test", "img_size": 64, "created": "2026-01-01T00:00:00+00:00",
            "command": "python -m engines.bench --model t2t_vit_test", "weights": "random",
            "host": {"cpu": "Test CPU", "cpu_cores": 2, "cpu_cores_usable": 2, "torch": "2.x", "torch_threads": 2,
                     "onnxruntime": "1.x", "gpu": None},
            "tensorrt": {"ran": ran, "reason": "trtexec not found", "version": None, "runs": [], "sidecar": {}},
            "rows": rows, "skipped": [{"backend": "onnxruntime-cpu-int8", "reason": "x.int8.onnx not found"}]}


def test_report_files(tmp_path):
    from engines.bench import report_stem, write_report

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
    paths = write_report(report, tmp_path / "r", stem)
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
    rc = main(["--model", "t2t_vit_test", "--out", str(out), "--tensorrt", "auto", "--batches", "1", "2",
               "--backends", "ort-cpu", "torch-cpu", "--min-time", "0", "--min-iters", "2", "--warmup", "1",
               "--report-dir", str(tmp_path / "reports"), "--quiet"])
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


# ----------------------------------------------------------------------------------------------------
# With TensorRT and a GPU (skipped here with the reason)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_and_run_matches_onnxruntime(tmp_path):
    import torch

    from engines.runners import OnnxRuntimeRunner
    from engines.trt_runtime import TensorRTRunner
    from export.to_onnx import export_onnx, model_metadata
    from t2t_vit.checkpoint import build_model

    model = build_model("t2t_vit_test").eval()
    onnx_path = export_onnx(model, tmp_path / "t2t_vit_test.fp32.onnx", precision="fp32",
                            metadata=model_metadata(model))
    side = B.build_engine("t2t_vit_test", "fp32", tmp_path, B.BuildSettings(1, 4, 8, 1024, 3,
                                                                             str(tmp_path / "t.cache")))
    assert (tmp_path / "t.cache").stat().st_size > 0 and side["profile"]["input"]["max"][0] == 8
    images = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 11 > max: split
    with OnnxRuntimeRunner(onnx_path) as ort_runner:
        ref = ort_runner.infer(images)
    with TensorRTRunner(tmp_path / "t2t_vit_test.fp32.engine") as trt_runner:
        got = trt_runner.infer(images)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=2e-2)
