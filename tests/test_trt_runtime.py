"""engines.trt_runtime: construction from a sidecar, batch splitting, availability, the end-to-end GPU tier."""
from __future__ import annotations

import types

import numpy as np
import pytest

from engines import build as B
from engines import sidecar as S
from engines import trt_compat as C
from tests.engine_helpers import (HAS_TRT, make_test_sidecar)


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
    from t2t_vit.runners import Runner
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


def test_rejected_tensor_address_is_an_error_not_silence(tmp_path):
    import torch

    from engines.trt_runtime import TensorRTRunner
    from t2t_vit.runners import RunnerError

    engine = tmp_path / "m.fp16.engine"
    engine.write_bytes(b"x")
    S.write_sidecar(engine, make_test_sidecar())
    runner = TensorRTRunner(engine)
    bound = []

    class Context:
        def set_tensor_address(self, name, address):
            bound.append((name, address))
            return name != "logits"  # TensorRT returns False for a tensor it does not know

    x = torch.zeros(2, 3)
    runner._bind(Context(), "input", x)
    assert bound == [("input", x.data_ptr())]
    with pytest.raises(RunnerError, match="rejected the buffer of tensor 'logits'"):
        runner._bind(Context(), "logits", x)


def test_tensorrt_runner_batches_stay_inside_the_profile(tmp_path):
    # No device: _run is replaced by a stand-in that enforces the profile like set_input_shape would.
    import torch

    from t2t_vit.runners import RunnerError
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
# With TensorRT and a GPU (skipped here with the reason)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_and_run_matches_onnxruntime(tmp_path):
    import torch

    from t2t_vit.runners import OnnxRuntimeRunner
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
