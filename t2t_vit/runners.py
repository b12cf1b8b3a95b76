"""Inference runners: one interface over PyTorch, ONNX Runtime and TensorRT (Polygraphy-style runners).

Every runner is a context manager that touches its device only while activated::

    with OnnxRuntimeRunner("artifacts/t2t_vit_7/t2t_vit_7.fp16.onnx") as runner:
        logits = runner.infer(images)          # float32 NCHW torch tensor on CPU -> np.float32 (N, classes)

Constructors are cheap and device-free (they read files and metadata only), so a caller can build the
whole list of backends, ask each class for :meth:`Runner.availability`, and activate them one at a time.
``engines.trt_runtime.TensorRTRunner`` implements the same interface for TensorRT engines; it lives with
the rest of the TensorRT code, and the tools above the engines stage use it from there.

Backend names are the runner names, one vocabulary for every tool: :mod:`t2t_vit.backends` parses them
into typed specs, and :func:`engines.backends.resolve_backend` makes the runner a spec names.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataConfig
from .errors import T2TError
from .graphs import onnx_precision, ort_session_options, read_metadata

_logger = logging.getLogger(__name__)

__all__ = [
    "Runner",
    "RunnerError",
    "TorchRunner",
    "OnnxRuntimeRunner",
]


class RunnerError(T2TError, RuntimeError):
    """A runner that cannot be used as asked; the message says how to fix it."""


class Runner:
    """Base class: ``name``, ``precision``, ``infer`` and ``availability``; device work inside ``with`` only.

    Subclasses implement :meth:`_activate`, :meth:`_deactivate` and :meth:`_infer`.
    """

    name: str = "runner"
    precision: str = "fp32"

    def __init__(self) -> None:
        self._active = False

    # -- availability ---------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(True, "")`` when this backend can run here, else ``(False, reason and how to fix it)``."""
        return True, ""

    # -- lifetime ---------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def __enter__(self) -> "Runner":
        if self._active:
            raise RunnerError(f"{self.name} is already active; runners are not re-entrant")
        self._activate()
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._deactivate()
        finally:
            self._active = False

    def _activate(self) -> None:  # pragma: no cover - trivial default
        pass

    def _deactivate(self) -> None:  # pragma: no cover - trivial default
        pass

    # -- inference --------------------------------------------------------------------------------
    def infer(self, images: torch.Tensor) -> np.ndarray:
        """Logits for a float32 NCHW batch on the CPU, as a float32 ``(N, classes)`` numpy array."""
        if not self._active:
            raise RunnerError(f"{self.name}: call infer() inside `with runner:` (the runner is not active)")
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.ndim != 4:
            raise RunnerError(f"{self.name}: expected an NCHW batch, got shape {tuple(images.shape)}")
        out = self._infer(images.detach().to("cpu", torch.float32).contiguous())
        return np.ascontiguousarray(out, dtype=np.float32)

    def _infer(self, images: torch.Tensor) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain-data description for reports."""
        return {"name": self.name, "precision": self.precision, "class": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, precision={self.precision!r})"


# ----------------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class TorchRunner(Runner):
    """A PyTorch module in eval mode, optionally under autocast and/or ``torch.compile``.

    Args:
        model: the module (moved to ``device`` on activation and back to the CPU afterwards).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        autocast_dtype: None for fp32, else ``torch.bfloat16`` / ``torch.float16`` (or "bf16"/"fp16").
        compile: wrap the model with ``torch.compile`` on activation.
        name: report name; default ``pytorch-<device>-<precision>[-autocast][-compile]``.
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu", autocast_dtype: Any = None,
                 compile: bool = False, name: str | None = None) -> None:
        super().__init__()
        if isinstance(autocast_dtype, str):
            lookup = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                      "float16": torch.float16, "fp32": None, "float32": None, "none": None}
            if autocast_dtype.lower() not in lookup:
                raise RunnerError(f"autocast_dtype {autocast_dtype!r}: use one of bf16, fp16 or None")
            autocast_dtype = lookup[autocast_dtype.lower()]
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise RunnerError(f"autocast_dtype {autocast_dtype!r}: use torch.bfloat16, torch.float16 or None")
        self.model = model
        self.device = str(device)
        self.autocast_dtype = autocast_dtype
        self.compile = compile
        self.precision = _DTYPE_NAMES[autocast_dtype] if autocast_dtype is not None else "fp32"
        dev = self.device.split(":")[0]
        self.name = name or (f"pytorch-{dev}-{self.precision}" + ("-autocast" if autocast_dtype else "")
                             + ("-compile" if compile else ""))
        self._fn: Any = None

    @classmethod
    def availability(cls, device: str = "cpu") -> tuple[bool, str]:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            return False, "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False)"
        return True, ""

    def _activate(self) -> None:
        ok, why = self.availability(self.device)
        if not ok:
            raise RunnerError(f"{self.name}: {why}")
        self.model.eval().to(self.device)
        self._fn = torch.compile(self.model) if self.compile else self.model

    def _deactivate(self) -> None:
        self._fn = None
        if not self.device.startswith("cpu"):
            # Give the GPU memory back: the caller's model lives on the CPU outside `with`.
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def _infer(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True)
        dev_type = self.device.split(":")[0]
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=dev_type, dtype=self.autocast_dtype):
                    y = self._fn(x)
            else:
                y = self._fn(x)
        return y.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device, "compile": self.compile,
                "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxRuntimeRunner(Runner):
    """An ONNX file on ONNX Runtime's CPU or CUDA execution provider.

    Graph inputs typed fp16 get the fp32 batch cast to fp16 (the cast is part of what is measured, as
    it would be in a deployed pipeline); outputs are returned as float32 whatever the graph's type.

    Args:
        onnx_path: the model file; its ``metadata_props`` are read at construction (no session yet).
        provider: ``"cpu"`` or ``"cuda"``.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, all cores).
        name: report name; default ``onnxruntime-<provider>-<precision>``.
        spinning: whether idle pool threads busy-wait (None: ONNX Runtime's default, on); see
            :func:`t2t_vit.graphs.ort_session_options`.
    """

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 name: str | None = None, spinning: bool | None = None) -> None:
        super().__init__()
        provider = provider.lower()
        if provider not in _ORT_PROVIDERS:
            raise RunnerError(f"provider {provider!r}: use one of {sorted(_ORT_PROVIDERS)}")
        self.path = Path(onnx_path)
        self.provider = provider
        self.threads = threads
        self.spinning = spinning
        self.metadata = read_metadata(self.path)
        self.precision = onnx_precision(self.path, self.metadata)
        self.name = name or f"onnxruntime-{provider}-{self.precision}"
        self._session: Any = None
        self._input_name = ""
        self._input_dtype: Any = np.float32
        self._output_name = ""

    @property
    def data_config(self):
        """The preprocessing recorded in the file's metadata (:class:`t2t_vit.data.DataConfig`)."""
        return DataConfig.from_metadata(self.metadata)

    @classmethod
    def availability(cls, provider: str = "cpu") -> tuple[bool, str]:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        import onnxruntime as ort

        wanted = _ORT_PROVIDERS.get(provider.lower())
        if wanted is None:
            return False, f"unknown provider {provider!r}; use one of {sorted(_ORT_PROVIDERS)}"
        have = ort.get_available_providers()
        if wanted not in have:
            hint = " (install onnxruntime-gpu on a machine with an NVIDIA GPU)" if provider == "cuda" else ""
            return False, f"onnxruntime {ort.__version__} lacks {wanted}; it has {have}{hint}"
        if provider == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA GPU visible (torch.cuda.is_available() is False)"
        return True, ""

    def _activate(self) -> None:
        ok, why = self.availability(self.provider)
        if not ok:
            raise RunnerError(f"{self.name}: {why}")
        import onnxruntime as ort

        opts = ort_session_options(self.threads, spinning=self.spinning)
        providers = [_ORT_PROVIDERS[self.provider]]
        if self.provider != "cpu":
            providers.append("CPUExecutionProvider")
        session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        if _ORT_PROVIDERS[self.provider] not in session.get_providers():
            raise RunnerError(f"{self.name}: onnxruntime fell back to {session.get_providers()}; "
                              f"check the CUDA/cuDNN libraries onnxruntime-gpu needs")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise RunnerError(f"{self.path}: expected one graph input, found {[i.name for i in inputs]}")
        if inputs[0].type not in _ORT_TYPES:
            raise RunnerError(f"{self.path}: input {inputs[0].name!r} has type {inputs[0].type}; expected float")
        self._input_name = inputs[0].name
        self._input_dtype = _ORT_TYPES[inputs[0].type]
        names = [o.name for o in outputs]
        self._output_name = "logits" if "logits" in names else names[0]
        self._session = session

    def _deactivate(self) -> None:
        self._session = None

    def _infer(self, images: torch.Tensor) -> np.ndarray:
        x = images.numpy().astype(self._input_dtype, copy=False)
        (y,) = self._session.run([self._output_name], {self._input_name: x})
        return np.asarray(y).astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        spin = {} if self.spinning is None else {"spinning": self.spinning}  # None: ORT's default (on)
        return {**super().describe(), "path": str(self.path), "provider": self.provider, **spin,
                "onnxruntime": ort.__version__}
