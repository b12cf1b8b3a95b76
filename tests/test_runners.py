"""Runner interface: PyTorch and ONNX Runtime runners checked against direct computations."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.backends import backend_statuses
from t2t_vit.errors import T2TError
from t2t_vit.graphs import onnx_precision
from t2t_vit.runners import OnnxRuntimeRunner, Runner, RunnerError, TorchRunner


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    import timm

    import t2t_vit  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model("t2t_vit_test", num_classes=7).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """The tiny model exported directly with torch.onnx (independent of the project's exporter)."""
    path = tmp_path_factory.mktemp("onnx") / "t2t_vit_test.fp32.onnx"
    tiny_model.set_soft_split_impl("grouped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_model, (torch.randn(2, 3, 64, 64),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          dynamo=False, opset_version=17)
    tiny_model.set_soft_split_impl("unfold")
    m = onnx.load(str(path))
    helper.set_model_props(m, {"model": "t2t_vit_test", "precision": "fp32", "img_size": "64"})
    onnx.save(m, str(path))
    return path


def _fp16_linear_onnx(path: Path, weight: np.ndarray) -> Path:
    """A graph with fp16 input and output: logits = flatten(input) @ W (all fp16)."""
    n_in = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "fp16_linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float16), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"precision": "fp16"})
    assert n_in == 12
    onnx.save(model, str(path))
    return path


def test_torch_runner_matches_direct_forward(tiny_model):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model(x).numpy()
    runner = TorchRunner(tiny_model)
    assert runner.name == "pytorch-cpu-fp32" and runner.precision == "fp32"
    with runner:
        got = runner.infer(x)
    assert got.dtype == np.float32 and got.shape == (3, 7)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_torch_runner_bf16_autocast_is_close_but_not_identical(tiny_model):
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_model(x).numpy()
    with TorchRunner(tiny_model, autocast_dtype="bf16") as runner:
        got = runner.infer(x)
    assert runner.precision == "bf16" and "autocast" in runner.name
    assert got.dtype == np.float32
    diff = np.abs(got - ref)
    # bf16 keeps 8 mantissa bits: the result differs from fp32, but only by a bf16-sized error.
    assert diff.max() > 0
    assert diff.max() < 0.05 * (np.abs(ref).max() + 1.0)


def test_infer_outside_with_is_an_error(tiny_model):
    runner = TorchRunner(tiny_model)
    with pytest.raises(RunnerError, match="inside `with runner:`"):
        runner.infer(torch.zeros(1, 3, 64, 64))
    with runner:
        runner.infer(torch.zeros(1, 3, 64, 64))
    assert not runner.is_active
    with pytest.raises(RunnerError):
        runner.infer(torch.zeros(1, 3, 64, 64))


def test_torch_runner_rejects_unknown_dtype(tiny_model):
    with pytest.raises(RunnerError, match="bf16"):
        TorchRunner(tiny_model, autocast_dtype="int4")


def test_ort_runner_matches_torch(tiny_model, tiny_onnx):
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model(x).numpy()
    runner = OnnxRuntimeRunner(tiny_onnx)
    assert runner.precision == "fp32" and runner.name == "onnxruntime-cpu-fp32"
    assert runner.metadata["model"] == "t2t_vit_test"
    assert not runner.is_active  # construction reads metadata only
    with runner:
        got = runner.infer(x)
    assert got.shape == (5, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spinning", [False, True])
def test_ort_runner_sets_thread_spinning_in_its_session(tiny_onnx, spinning):
    """The session ONNX Runtime runs with (not just the options object) has both pools' spinning keys;
    without ``spinning`` the keys stay unset (ORT's default)."""
    from t2t_vit.graphs import ORT_SPINNING_KEYS

    want = "1" if spinning else "0"
    assert ORT_SPINNING_KEYS == ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
    with OnnxRuntimeRunner(tiny_onnx, threads=2, spinning=spinning) as runner:
        opts = runner._session.get_session_options()
        assert [opts.get_session_config_entry(k) for k in ORT_SPINNING_KEYS] == [want, want]
        assert runner.describe()["spinning"] is spinning
    with OnnxRuntimeRunner(tiny_onnx, threads=2) as runner:
        opts = runner._session.get_session_options()
        for key in ORT_SPINNING_KEYS:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                opts.get_session_config_entry(key)
        assert "spinning" not in runner.describe()


def test_ort_runner_casts_fp16_io(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 4)).astype(np.float16)
    path = _fp16_linear_onnx(tmp_path / "lin.fp16.onnx", w)
    x = torch.from_numpy(rng.standard_normal((6, 3, 2, 2)).astype(np.float32))
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer(x)
    assert runner.precision == "fp16"
    assert got.dtype == np.float32 and got.shape == (6, 4)
    expected = x.numpy().reshape(6, 12).astype(np.float16).astype(np.float32) @ w.astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


def test_onnx_precision_from_metadata_or_name(tmp_path):
    assert onnx_precision(tmp_path / "m.int8.onnx") == "int8"
    assert onnx_precision(tmp_path / "m.fp16.onnx") == "fp16"
    assert onnx_precision(tmp_path / "m.onnx") == "fp32"
    assert onnx_precision(tmp_path / "m.fp32.onnx", {"precision": "int8"}) == "int8"


def test_missing_onnx_file_says_how_to_make_it(tmp_path):
    with pytest.raises(T2TError, match="make onnx"):
        OnnxRuntimeRunner(tmp_path / "nope.onnx")


def test_ort_cuda_unavailable_here_says_why(tiny_onnx):
    ok, why = OnnxRuntimeRunner.availability("cuda")
    if ok:
        pytest.skip("CUDAExecutionProvider is available on this machine")
    assert why
    runner = OnnxRuntimeRunner(tiny_onnx, provider="cuda")
    with pytest.raises(RunnerError, match="CUDA|cuda"):
        runner.__enter__()


def test_backend_statuses_cover_every_family_with_reasons():
    statuses = {s.backend: s for s in backend_statuses()}
    assert set(statuses) == {"pytorch-cpu", "pytorch-cuda", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"}
    assert statuses["pytorch-cpu"].available and statuses["onnxruntime-cpu"].available
    assert statuses["pytorch-cuda"].available == torch.cuda.is_available()
    for s in statuses.values():
        assert s.available or s.reason  # never unavailable without saying why


def test_base_runner_validates_and_casts_output():
    class Half(Runner):
        name = "half"

        def _infer(self, images):
            return images.numpy().reshape(len(images), -1)[:, :2] * 0.5

    with Half() as r:
        out = r.infer(torch.ones(2, 1, 1, 2, dtype=torch.float64))
    np.testing.assert_array_equal(out, np.full((2, 2), 0.5, np.float32))
    assert out.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# The backend vocabulary and the one factory
# ------------------------------------------------------------------------------------------------
def test_backend_names_parse_to_typed_specs_and_back():
    import dataclasses

    from t2t_vit.backends import BackendSpec, all_backends, parse_backend

    specs = all_backends()
    # pytorch 3 precisions x 2 devices + 2 compiled, onnxruntime 5 graphs x 2 providers, tensorrt 4 engines
    assert len({s.name for s in specs}) == len(specs) == 22  # one name per spec, no two specs share one
    for spec in specs:
        assert parse_backend(spec.name) == spec and parse_backend(spec.name.upper()) == spec
    assert parse_backend("onnxruntime-cuda-int8-cpu") == BackendSpec("onnxruntime", "cuda", "int8-cpu")
    assert parse_backend("pytorch-cpu-bf16-autocast") == BackendSpec("pytorch", "cpu", "bf16")
    assert parse_backend("pytorch-cuda-fp32-compile") == BackendSpec("pytorch", "cuda", "fp32", compile=True)
    assert parse_backend("tensorrt-int8") == BackendSpec("tensorrt", "cuda", "int8")
    assert parse_backend("onnxruntime-cpu-fp8") == BackendSpec("onnxruntime", "cpu", "fp8")
    assert parse_backend("tensorrt-fp8") == BackendSpec("tensorrt", "cuda", "fp8")
    # ONNX Runtime on the fp8 graph is an emulation, and says what it leaves out; nothing else is one
    assert [s.name for s in specs if s.emulation] == ["onnxruntime-cpu-fp8", "onnxruntime-cuda-fp8"]
    assert "no FP8 GEMM accumulation is modelled" in parse_backend("onnxruntime-cpu-fp8").emulation
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs[0].precision = "fp16"
    for bad in (("tensorrt", "cpu", "fp16"), ("pytorch", "cpu", "int8"), ("tensorflow", "cpu", "fp32"),
                ("onnxruntime", "tpu", "fp32")):
        with pytest.raises(RunnerError):
            BackendSpec(*bad)


def test_unknown_and_old_backend_names_are_one_line_errors():
    from t2t_vit.backends import parse_backend

    with pytest.raises(RunnerError) as e:
        parse_backend("tensorflow-cpu")
    msg = str(e.value)
    assert "\n" not in msg and "onnxruntime-cpu-int8-cpu" in msg and "tensorrt-fp16" in msg
    # The pre-vocabulary spellings are gone; the error names what replaces them.
    for old, new in (("ort-fp16", "onnxruntime-cpu-fp16"), ("trt-int8", "tensorrt-int8"),
                     ("torch-cuda-bf16", "pytorch-cuda-bf16-autocast"), ("pytorch-fp32", "pytorch-cpu-fp32"),
                     ("ort-fp8", "onnxruntime-cpu-fp8"), ("trt-fp8", "tensorrt-fp8")):
        with pytest.raises(RunnerError, match="old backend names") as e:
            parse_backend(old)
        assert new in str(e.value) and "\n" not in str(e.value)


def test_resolve_backend_makes_the_runner_or_says_why_not(tiny_model, tiny_onnx, tmp_path):
    from engines.backends import Skip, resolve_backend
    from engines.trt_runtime import TensorRTRunner

    x = torch.randn(2, 3, 64, 64)
    runner = resolve_backend("onnxruntime-cpu-fp32", tiny_onnx.parent, "t2t_vit_test", threads=1)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.path == tiny_onnx and runner.name == "onnxruntime-cpu-fp32"
    runner = resolve_backend("pytorch-cpu-bf16-autocast", tmp_path, "t2t_vit_test", model=tiny_model)
    assert isinstance(runner, TorchRunner) and runner.name == "pytorch-cpu-bf16-autocast"
    assert runner.autocast_dtype == torch.bfloat16
    built = []
    runner = resolve_backend("pytorch-cpu-fp32", tmp_path, "t2t_vit_test", model=lambda: built.append(1) or tiny_model)
    assert built == [1]  # a model factory is called only for a PyTorch backend
    with runner:
        np.testing.assert_allclose(runner.infer(x), tiny_model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    skip = resolve_backend("onnxruntime-cpu-int8", tmp_path, "t2t_vit_test", model=lambda: built.append(2))
    assert isinstance(skip, Skip) and built == [1]
    assert skip.artifact == str(tmp_path / "t2t_vit_test.int8.onnx")
    assert "not found" in skip.reason and "make calib MODEL=t2t_vit_test" in skip.reason
    ok, why = TensorRTRunner.availability()
    trt = resolve_backend("tensorrt-fp16", tmp_path, "t2t_vit_test")
    assert isinstance(trt, Skip) and (trt.reason == why if not ok else "make engine PRECISION=fp16" in trt.reason)
    with pytest.raises(RunnerError, match="use onnxruntime-cpu-fp32"):
        resolve_backend("ort-fp32", tmp_path, "t2t_vit_test")


def test_an_engine_is_skipped_on_a_gpu_below_its_recorded_compute_capability(tmp_path, monkeypatch):
    """An fp8 engine records SM 8.9 (in its sidecar, or in the ONNX metadata the sidecar carries): on an older GPU
    the factory skips it with one line naming the requirement and the GPU, before anything touches TensorRT."""
    from engines import sidecar as S
    from engines.backends import Skip, capability_shortfall, required_compute_capability, resolve_backend
    from engines.trt_runtime import TensorRTRunner
    from tests.engine_helpers import make_test_sidecar

    assert required_compute_capability({"onnx_metadata": {"requires_compute_capability": "8.9"}}) == "8.9"
    assert required_compute_capability({"requires_compute_capability": "9.0",
                                        "onnx_metadata": {"requires_compute_capability": "8.9"}}) == "9.0"
    assert required_compute_capability({"precision": "fp16", "onnx_metadata": {}}) is None
    assert required_compute_capability({"requires_compute_capability": "8.9"}) == "8.9"  # a graph's own metadata
    ada, turing = {"name": "NVIDIA L4", "compute_capability": "8.9"}, {"name": "Tesla T4", "compute_capability": "7.5"}
    hopper, ampere = {"name": "NVIDIA H100", "compute_capability": "9.0"}, {"name": "A100", "compute_capability": "8.0"}
    assert capability_shortfall("8.9", ada) == capability_shortfall("8.9", hopper) == ""
    assert capability_shortfall(None, turing) == ""
    assert capability_shortfall("8.9", {"name": "RTX 3090", "compute_capability": "8.6"})
    assert capability_shortfall("8.9", {"name": "future", "compute_capability": "10.0"}) == ""  # numeric, not text

    engine = tmp_path / "t2t_vit_test.fp8.engine"
    engine.write_bytes(b"never deserialized here")
    S.write_sidecar(engine, make_test_sidecar(model="t2t_vit_test", precision="fp8",
                                              onnx_metadata={"precision": "fp8", "requires_compute_capability": "8.9"}))
    monkeypatch.setattr(TensorRTRunner, "availability", classmethod(lambda cls: (True, "")))
    skip = resolve_backend("tensorrt-fp8", tmp_path, "t2t_vit_test", gpu=lambda: turing)
    assert isinstance(skip, Skip) and skip.artifact == str(engine)
    assert skip.reason == (f"{engine} (an fp8 engine) needs a GPU of compute capability 8.9 or later; this GPU "
                           f"(Tesla T4) has 7.5")
    assert isinstance(resolve_backend("tensorrt-fp8", tmp_path, "t2t_vit_test", gpu=lambda: ampere), Skip)
    runner = resolve_backend("tensorrt-fp8", tmp_path, "t2t_vit_test", gpu=lambda: hopper)
    assert isinstance(runner, TensorRTRunner) and runner.name == "tensorrt-fp8"
    # An engine recording no requirement never asks for the GPU.
    S.write_sidecar(tmp_path / "t2t_vit_test.fp16.engine", make_test_sidecar(model="t2t_vit_test"))
    (tmp_path / "t2t_vit_test.fp16.engine").write_bytes(b"x")
    asked = []
    assert isinstance(resolve_backend("tensorrt-fp16", tmp_path, "t2t_vit_test", gpu=lambda: asked.append(1)),
                      TensorRTRunner) and asked == []
