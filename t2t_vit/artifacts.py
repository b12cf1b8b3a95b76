"""Where each stage's artifacts live: one naming scheme for the whole pipeline.

    artifacts/<model>/                  default output folder of every stage (OUT=...)
        <model>.fp32.onnx                make onnx
        <model>.fp16.onnx                make onnx
        <model>.int8.onnx                make calib (TensorRT Q/DQ graph)
        <model>.int8-cpu.onnx            make calib TARGET=cpu (ONNX Runtime CPU integer kernels)
        <model>.fp8.onnx                 make calib PRECISION=fp8 (TensorRT float8e4m3fn Q/DQ graph, SM 8.9+)
        <model>.<precision>.engine       make engine (+ .engine.json sidecar)
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["GRAPH_PRECISIONS", "ENGINE_PRECISIONS", "default_out", "onnx_path", "engine_path", "make_hint"]

# Precisions of the ONNX graphs the pipeline writes, and of the TensorRT engines built from them.
GRAPH_PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "fp8")
ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "fp8")


def default_out(model: str) -> Path:
    """Where a model's artifacts go unless OUT / --out says otherwise."""
    return Path("artifacts") / model


def onnx_path(out: str | os.PathLike, model: str, precision: str) -> Path:
    return Path(out) / f"{model}.{precision}.onnx"


def engine_path(out: str | os.PathLike, model: str, precision: str) -> Path:
    return Path(out) / f"{model}.{precision}.engine"


def make_hint(precision: str, model: str, checkpoint: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None) -> str:
    """The make command that creates the ONNX graph of ``precision`` (with CHECKPOINT= / OUT= when given)."""
    extra = "".join(f" {k}={v}" for k, v in (("CHECKPOINT", checkpoint), ("OUT", out)) if v)
    if precision == "int8":
        return f"`make calib MODEL={model}{extra} CALIB_DATA=...`" if extra else f"`make calib MODEL={model}`"
    if precision == "fp8":
        return (f"`make calib MODEL={model}{extra} CALIB_DATA=... PRECISION=fp8`" if extra
                else f"`make calib MODEL={model} PRECISION=fp8`")
    if precision == "int8-cpu":
        return (f"`make calib MODEL={model}{extra} CALIB_DATA=... TARGET=cpu`" if extra
                else f"`make calib MODEL={model} TARGET=cpu`")
    return f"`make onnx MODEL={model}{extra}`"
