"""engines.sidecar: round trip and refusal of another TensorRT version / GPU / engine file."""
from __future__ import annotations

import json

import pytest

from engines import sidecar as S
from tests.engine_helpers import (make_test_sidecar)


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
