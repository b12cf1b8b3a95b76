"""Helpers shared by the engines/ tests: small ONNX graphs ONNX Runtime can run, an artifact folder, a sidecar."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engines import sidecar as S

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



def make_test_sidecar(**over) -> dict:
    kw = dict(model="t2t_vit_12", precision="fp16",
              profile={"input": {"min": [1, 3, 224, 224], "opt": [32, 3, 224, 224], "max": [128, 3, 224, 224]}},
              onnx_path="artifacts/t2t_vit_12/t2t_vit_12.fp16.onnx", onnx_sha256="a" * 64, engine_sha256="b" * 64,
              tensorrt_version="10.13.3.9", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
              build_time_s=12.3456, built_at="2026-01-01T00:00:00+00:00", onnx_metadata={"model": "t2t_vit_12"},
              data_config=data_meta(224), builder={"opt_level": 3})
    kw.update(over)
    return S.make_sidecar(**kw)

