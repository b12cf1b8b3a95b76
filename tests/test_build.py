"""engines.build: the plan from a small ONNX (shapes, data config, errors), the build (our code and Polygraphy's
real TensorRT loaders) against a recording stand-in for tensorrt (it produces no engine), and the no-TensorRT
failure mode that writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines import build as B
from engines import sidecar as S
from engines import trt_compat as T
from tests.engine_helpers import (INSTALL, REPO, data_meta, listing, no_trt,
                                  tiny_out, write_onnx)
from tests.recording_trt import REMOVED_IN_11, Recorder, install, make_recording_trt


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
        B.plan_build("t2t_vit_7", "fp32", tmp_path / "x", B.BuildSettings(), onnx_file=tiny_out(tmp_path / "y") /
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
# build: our code and Polygraphy's real loaders against a recording stand-in for tensorrt (no engine is built)
# ----------------------------------------------------------------------------------------------------
def _fake(monkeypatch, rec, **kw):
    trt = make_recording_trt(rec, **kw)
    monkeypatch.setattr(B, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(B, "gpu_info", lambda: {"name": "Test GPU", "compute_capability": "9.0"})
    install(monkeypatch, trt)
    return trt


def _flag_calls(rec):
    return [c for c in rec.calls if c[0] in ("set_flag", "clear_flag")]


def test_build_wiring_with_recording_stand_in(tmp_path, monkeypatch):
    rec = Recorder()
    _fake(monkeypatch, rec)
    out = tiny_out(tmp_path / "out")
    cache = tmp_path / "cache" / "timing.cache"
    settings = B.BuildSettings(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256, opt_level=5,
                               timing_cache=str(cache))
    side = B.build_engine("t2t_vit_test", "fp32", out, settings)

    engine = out / "t2t_vit_test.fp32.engine"
    assert engine.read_bytes() == b"FAKE-ENGINE"
    calls = rec.calls
    assert ("create_network", 1 << 3) in calls  # the enum member's bit, on 10.x
    assert ("parse_from_file", str(out / "t2t_vit_test.fp32.onnx")) in calls  # external weights are found
    assert ("set_memory_pool_limit", "WORKSPACE", 256 * 2**20) in calls
    assert ("set", "builder_optimization_level", 5) in calls
    assert ("set_shape", "input", [1, 3, 64, 64], [4, 3, 64, 64], [8, 3, 64, 64]) in calls
    assert calls.count(("add_optimization_profile",)) == 1
    assert ("set_timing_cache", False) in calls and ("create_timing_cache", b"") in calls
    assert _flag_calls(rec) == [("clear_flag", "TF32")]  # fp32 means fp32 unless --tf32; no precision flag
    assert not [c for c in calls if c[0] in ("mark_output", "unmark_output")]
    assert cache.read_bytes() == b"T1"
    # the sidecar describes this build
    on_disk = S.read_sidecar(engine)
    assert on_disk == json.loads(json.dumps(side))
    import hashlib

    import polygraphy

    assert on_disk["engine_sha256"] == hashlib.sha256(b"FAKE-ENGINE").hexdigest()
    assert on_disk["onnx_sha256"] == hashlib.sha256((out / "t2t_vit_test.fp32.onnx").read_bytes()).hexdigest()
    assert on_disk["gpu"] == {"name": "Test GPU", "compute_capability": "9.0"}
    assert on_disk["tensorrt_version"] == "10.13.3.9"
    assert on_disk["builder"]["workspace_mib"] == 256 and on_disk["builder"]["network_creation_flags"] == 8
    assert on_disk["builder"]["polygraphy"] == polygraphy.__version__
    assert on_disk["data_config"] == data_meta(64)
    assert on_disk["profile"]["input"]["opt"] == [4, 3, 64, 64]
    assert on_disk["builder"]["tf32"].startswith("cleared") and on_disk["builder"]["tf32"] is not True

    # A second build (here on "11.x": no creation flag, TF32 allowed) starts from the saved timing cache, and
    # a third build that wrote the file meanwhile keeps its entries: the caches are merged, not overwritten.
    rec2 = Recorder()

    def concurrent_build():
        cache.write_bytes(b"T1+T3")

    _fake(monkeypatch, rec2, version="11.4.0.106", timings="T2", during_build=concurrent_build)
    side2 = B.build_engine("t2t_vit_test", "fp32", out, B.BuildSettings(**{**settings.__dict__, "tf32": True}))
    assert ("create_timing_cache", b"T1") in rec2.calls
    assert ("create_network", 0) in rec2.calls
    assert _flag_calls(rec2) == [("set_flag", "TF32")] and side2["builder"]["tf32"].startswith("allowed")
    assert ("combine", False) in rec2.calls  # our merge: another GPU's timings are never taken in
    assert cache.read_bytes() == b"T1+T2+T3"
    assert not [p for p in out.rglob("*.tmp")]


def test_polygraphy_reads_exactly_the_listed_names(tmp_path, monkeypatch):
    """The names the build path reads (ours and Polygraphy's loaders, on 10.x and 11.x, with and without every
    tensor marked) are the names trt_compat lists, which the names test checks against both binding wheels."""
    out = tiny_out(tmp_path / "out")
    seen: set[str] = set()
    for version in ("10.13.3.9", "11.4.0.106"):
        for mark_all, tf32 in ((False, False), (True, False), (False, True)):
            rec = Recorder()
            _fake(monkeypatch, rec, version=version)
            settings = B.BuildSettings(1, 2, 4, timing_cache=str(tmp_path / f"{version}.cache"), tf32=tf32)
            shapes = B.profile_shapes({"input": ["batch", 3, 64, 64]}, settings)
            built = B.build_serialized_engine(out / "t2t_vit_test.fp32.onnx", shapes, settings,
                                              mark_all_outputs=mark_all)
            assert built.serialized == b"FAKE-ENGINE" and built.tensorrt_version == version
            marked = [c[1] for c in rec.calls if c[0] == "mark_output"]
            # ModifyNetworkOutputs(MARK_ALL): every layer's output, the graph output re-marked
            assert marked == (["pooled", "logits"] if mark_all else [])
            # the one builder flag: TF32, cleared unless asked for; never a precision flag
            assert _flag_calls(rec) == [("set_flag" if tf32 else "clear_flag", "TF32")]
            assert rec.missing == (T.TRT_NAMES_VIA_POLYGRAPHY_10_ONLY - {"get_quantization_flag"}
                                   if version.startswith("11") else set())
            seen |= rec.names
    listed = T.TRT_NAMES_USED | T.TRT_NAMES_VIA_POLYGRAPHY
    assert not seen - listed, f"read on the build path but not listed in trt_compat: {sorted(seen - listed)}"
    stale = T.TRT_NAMES_VIA_POLYGRAPHY - seen
    assert not stale, f"TRT_NAMES_VIA_POLYGRAPHY lists names the build path no longer reads: {sorted(stale)}"
    assert REMOVED_IN_11 == T.TRT_NAMES_VIA_POLYGRAPHY_10_ONLY  # the stand-in's 11.x lacks exactly these


@pytest.mark.parametrize("fault,message", [
    ({"serialized": None}, "failed to build"),  # the builder returns no engine
    ({"parse_errors": ("In node 0 (GlobalAveragePool): UNSUPPORTED_NODE",)}, "parser rejected"),
])
def test_failed_build_writes_nothing(tmp_path, monkeypatch, fault, message):
    _fake(monkeypatch, Recorder(), **fault)
    out = tiny_out(tmp_path / "out")
    before = listing(tmp_path)
    with pytest.raises(B.BuildError, match=message):
        B.build_engine("t2t_vit_test", "fp32", out, B.BuildSettings(timing_cache=str(tmp_path / "c" / "t.cache")))
    assert listing(tmp_path) == before


def test_mismatched_timing_cache_is_replaced_not_merged(tmp_path, monkeypatch):
    rec = Recorder()
    _fake(monkeypatch, rec, timings="NEW")
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"FOREIGN+OLD")  # written by another TensorRT version or GPU
    out = tiny_out(tmp_path / "out")
    B.build_engine("t2t_vit_test", "fp32", out, B.BuildSettings(timing_cache=str(cache)))
    assert ("create_timing_cache", b"FOREIGN+OLD") in rec.calls  # offered to TensorRT, which refused it
    assert cache.read_bytes() == b"NEW"  # the foreign entries are gone, this build's are kept
    assert ("combine", True) not in rec.calls
