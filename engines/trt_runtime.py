"""Run a TensorRT engine behind the shared :class:`t2t_vit.runners.Runner` interface.

TensorRT 10/11 tensor API only (unchanged between the two): ``set_input_shape``, ``set_tensor_address``
and ``execute_async_v3`` on a CUDA stream, with input/output buffers held as torch CUDA tensors (so no
pycuda / cuda-python dependency). The sidecar written by ``make engine`` is checked against the running
TensorRT version and GPU before the engine is deserialized, and a GPU below the engine's
``requires_compute_capability`` (fp8: SM 8.9) is refused even with ``check=False``::

    with TensorRTRunner("artifacts/t2t_vit_12/t2t_vit_12.fp16.engine") as runner:
        logits = runner.infer(images)   # float32 NCHW CPU tensor -> np.float32 (N, classes)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2t_vit.runners import Runner, RunnerError

from .sidecar import check_requirements, check_sidecar, data_config_from_sidecar, read_sidecar
from .trt_compat import gpu_info, import_tensorrt, tensorrt_availability

__all__ = ["TensorRTRunner", "batch_chunks"]


def batch_chunks(n: int, max_batch: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that split ``n`` images into runs of at most ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


class TensorRTRunner(Runner):
    """A serialized engine (``make engine``) on the current CUDA device.

    Construction reads the sidecar only; ``with`` checks it against the running TensorRT/GPU,
    deserializes the engine and creates the execution context and stream. Batches larger than the
    profile's maximum are split; smaller than its minimum are refused with the profile in the message.

    Args:
        engine_path: the ``.engine`` file; its ``.engine.json`` sidecar must sit beside it.
        check: refuse an engine whose sidecar names another TensorRT version or GPU (default True).
        name: report name; default ``tensorrt-<precision>``.
    """

    def __init__(self, engine_path: str | os.PathLike, check: bool = True, name: str | None = None) -> None:
        super().__init__()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise RunnerError(f"engine not found: {self.path} (build it with `make engine`)")
        self.sidecar = read_sidecar(self.path)
        self.check = check
        self.precision = str(self.sidecar["precision"])
        self.name = name or f"tensorrt-{self.precision}"
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._input_name = ""
        self._output_name = ""
        self._dtypes: dict[str, torch.dtype] = {}
        self._batch_range = (1, 1)

    @property
    def data_config(self):
        """Preprocessing recorded at build time (:class:`t2t_vit.data.DataConfig`)."""
        return data_config_from_sidecar(self.sidecar)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return tensorrt_availability()

    # -- lifetime ---------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt = import_tensorrt()
        gpu = gpu_info()
        # Even with check=False: an fp8 engine on a GPU below SM 8.9 has no kernels to run, only a cryptic failure.
        check_requirements(self.sidecar, gpu=gpu, engine_path=self.path)
        data = self.path.read_bytes()
        if self.check:
            check_sidecar(self.sidecar, tensorrt_version=trt.__version__, gpu_name=gpu["name"],
                          compute_capability=gpu["compute_capability"],
                          engine_sha256=hashlib.sha256(data).hexdigest(), engine_path=self.path)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RunnerError(f"TensorRT could not deserialize {self.path} (see its log above); rebuild it with "
                              f"`make engine MODEL={self.sidecar['model']} PRECISION={self.precision}`")
        context = engine.create_execution_context()
        if context is None:
            raise RunnerError(f"{self.path}: could not create an execution context (out of GPU memory?)")

        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else outputs).append(tname)
            self._dtypes[tname] = _torch_dtype(trt, engine.get_tensor_dtype(tname))
        if len(inputs) != 1 or not outputs:
            raise RunnerError(f"{self.path}: expected one input and at least one output, got {inputs} / {outputs}")
        self._input_name = inputs[0]
        self._output_name = "logits" if "logits" in outputs else outputs[0]
        lo, _, hi = engine.get_tensor_profile_shape(self._input_name, 0)
        self._batch_range = (int(lo[0]), int(hi[0]))
        self._runtime, self._engine, self._context = runtime, engine, context
        self._stream = torch.cuda.Stream()

    def _deactivate(self) -> None:
        # Release in reverse order of creation; the engine must outlive its context.
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    # -- inference --------------------------------------------------------------------------------
    def _infer(self, images: torch.Tensor) -> np.ndarray:
        lo, hi = self._batch_range
        n = images.shape[0]
        if n < lo:
            raise RunnerError(f"{self.name}: batch {n} is below the engine profile's minimum {lo}; "
                              f"rebuild with `make engine ARGS='--min-batch {n}'`")
        parts = []
        for a, b in batch_chunks(n, hi):
            if b - a < lo:
                # Only the last chunk can be short (n >= lo): TensorRT would reject it, so rerun the last
                # `lo` images and keep the outputs of the new ones.
                parts.append(self._run(images[b - lo:b])[lo - (b - a):])
            else:
                parts.append(self._run(images[a:b]))
        return np.concatenate(parts, axis=0)

    def _run(self, images: torch.Tensor) -> np.ndarray:
        context = self._context
        stream = self._stream
        assert context is not None and stream is not None
        # Everything (copy in, execute, copy out) is ordered on one stream.
        with torch.cuda.stream(stream):
            x = images.to("cuda", non_blocking=True).to(self._dtypes[self._input_name]).contiguous()
            if not context.set_input_shape(self._input_name, tuple(x.shape)):
                raise RunnerError(f"{self.name}: TensorRT rejected input shape {tuple(x.shape)}; the engine profile "
                                  f"is {self.sidecar['profile']}")
            self._bind(context, self._input_name, x)
            buffers = {}
            for tname, dtype in self._dtypes.items():
                if tname == self._input_name:
                    continue
                shape = tuple(int(d) for d in context.get_tensor_shape(tname))
                buffers[tname] = torch.empty(shape, dtype=dtype, device="cuda")
                self._bind(context, tname, buffers[tname])
            if not context.execute_async_v3(stream.cuda_stream):
                raise RunnerError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")
            y = buffers[self._output_name].float().cpu()
        stream.synchronize()
        return y.numpy()

    def _bind(self, context: Any, tname: str, buf: torch.Tensor) -> None:
        """``set_tensor_address``, checked: TensorRT returns False for a name or address it rejects."""
        if not context.set_tensor_address(tname, int(buf.data_ptr())):
            raise RunnerError(f"{self.name}: TensorRT rejected the buffer of tensor {tname!r} (shape "
                              f"{tuple(buf.shape)}, {buf.dtype}); is {self.path} the engine its sidecar "
                              f"describes?")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "tensorrt": self.sidecar["tensorrt_version"],
                "gpu": self.sidecar["gpu"], "profile": self.sidecar["profile"]}


def _torch_dtype(trt: Any, trt_dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.uint8: torch.uint8}
    if trt_dtype not in table:
        raise RunnerError(f"engine I/O tensor type {trt_dtype} has no torch equivalent here")
    return table[trt_dtype]
