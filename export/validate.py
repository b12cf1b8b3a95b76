"""Validate exported graphs on ONNX Runtime's CPU provider against the PyTorch model.

Thresholds: the fp32 graph must match PyTorch to ``FP32_MAX_ABS_DELTA`` (1e-4 in logit units; the
report also gives it relative to the logit scale, max |logit|), and the fp16 graph must agree with
the fp32 graph on top-1 for at least ``FP16_MIN_TOP1_AGREEMENT`` (99.5%) of the images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FP32_MAX_ABS_DELTA",
    "FP16_MIN_TOP1_AGREEMENT",
    "ort_session",
    "ort_logits",
    "torch_logits",
    "compare",
    "validation_images",
    "validate_graphs",
    "environment",
]

FP32_MAX_ABS_DELTA = 1e-4
FP16_MIN_TOP1_AGREEMENT = 0.995


def ort_session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session (lazy import)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_logits(session, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """float32 logits of an ORT session for float32 NCHW images (cast to the graph's input type)."""
    inp = session.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].numpy().astype(dtype)
        out.append(session.run(None, {inp.name: x})[0].astype(np.float32))
    return np.concatenate(out)


@torch.inference_mode()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    model.eval()
    return np.concatenate([model(images[i:i + batch_size]).float().numpy()
                           for i in range(0, len(images), batch_size)])


def compare(reference: np.ndarray, candidate: np.ndarray, name: str) -> dict[str, Any]:
    """max/mean |delta|, delta relative to the reference logit scale, top-1 agreement."""
    delta = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    scale = float(np.abs(reference).max())
    agree = reference.argmax(1) == candidate.argmax(1)
    return {
        "name": name,
        "n": int(len(reference)),
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
        "logit_scale": scale,
        "max_rel_delta": float(delta.max() / scale) if scale > 0 else float("inf"),
        "top1_agreement": float(agree.mean()),
        "disagreements": int((~agree).sum()),
        "finite": bool(np.isfinite(candidate).all()),
    }


def _class_to_idx(model: nn.Module, folders: list[str]) -> dict[str, int] | None:
    """Folder name -> model class index, when the model's label space is known; None otherwise."""
    from t2t_vit.data import imagenet_wnids

    names = (getattr(model, "pretrained_cfg", None) or {}).get("class_names")
    if names and set(folders) <= set(names):
        return {n: i for i, n in enumerate(names)}
    if getattr(model, "num_classes", 0) == 1000:
        wnids = imagenet_wnids()
        if set(folders) <= set(wnids):
            return {n: i for i, n in enumerate(wnids)}
    if not names and getattr(model, "num_classes", 0) == len(folders):
        return {n: i for i, n in enumerate(sorted(folders))}  # ImageFolder order, as training uses
    return None


def validation_images(model: nn.Module, data: str | os.PathLike | None, n: int,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``n`` class-balanced images preprocessed by the model's own eval transform, their labels in the
    model's label space (None when unknown), and a description of the source.

    Without image data (``data`` None and ``../shared/data`` absent) the images are N(0, 1) noise with a
    warning: the graphs are still compared, but not on real inputs.
    """
    from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset, scan_image_folder

    from .to_onnx import DEFAULT_DATA

    root = Path(data) if data else DEFAULT_DATA
    if (root / "val").is_dir():  # a dataset root (train/ and val/ inside), as DATA is for training
        root = root / "val"
    cfg = DataConfig.from_model(model)
    if data is None and not root.is_dir():
        import warnings

        warnings.warn(f"no validation images at {root}: validating on random N(0,1) inputs instead; pass --data")
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g), None,
                "random N(0,1) inputs (no image data)")
    samples, folders = scan_image_folder(root)
    mapping = _class_to_idx(model, folders)
    subset = class_balanced_subset(samples, n, seed=seed)
    images, labels, _ = ImageBatcher(subset, cfg, batch_size=64).tensor()
    if mapping is not None:
        labels = torch.tensor([mapping[folders[int(i)]] for i in labels])
    source = (f"{root} ({len(images)} class-balanced images, seed {seed}; {cfg.interpolation} resize "
              f"{cfg.resize_size}, center crop {cfg.img_size})")
    return images, (labels if mapping is not None else None), source


def validate_graphs(model: nn.Module, fp32_path: str | os.PathLike, fp16_path: str | os.PathLike,
                    images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 50,
                    source: str = "") -> dict[str, Any]:
    """Compare PyTorch fp32, ORT fp32 and ORT fp16 logits; thresholds applied, ``passed`` overall."""
    ref = torch_logits(model, images, batch_size)
    l32 = ort_logits(ort_session(fp32_path), images, batch_size)
    l16 = ort_logits(ort_session(fp16_path), images, batch_size)
    c32 = compare(ref, l32, "ORT fp32 vs PyTorch fp32")
    c32.update(threshold=f"max abs delta <= {FP32_MAX_ABS_DELTA:g}",
               passed=c32["finite"] and c32["max_abs_delta"] <= FP32_MAX_ABS_DELTA)
    c16 = compare(l32, l16, "ORT fp16 vs ORT fp32")
    c16.update(threshold=f"top-1 agreement >= {100 * FP16_MIN_TOP1_AGREEMENT:g}%",
               passed=c16["finite"] and c16["top1_agreement"] >= FP16_MIN_TOP1_AGREEMENT)
    c16t = compare(ref, l16, "ORT fp16 vs PyTorch fp32")
    out: dict[str, Any] = {
        "n_images": int(len(images)),
        "source": source,
        "logit_scale": float(np.abs(ref).max()),
        "comparisons": [c32, c16, c16t],
        "passed": bool(c32["passed"] and c16["passed"]),
    }
    if labels is not None:
        y = labels.numpy()
        out["labels_top1"] = {k: float((v.argmax(1) == y).mean()) for k, v in
                              (("PyTorch fp32", ref), ("ORT fp32", l32), ("ORT fp16", l16))}
    # The fp32-vs-fp16 top-1 margin: a disagreement on a near-tie (random weights) is not an error.
    top2 = np.sort(l32, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    out["fp32_top1_margin_median"] = float(np.median(margin))
    if c16["disagreements"]:
        dis = l32.argmax(1) != l16.argmax(1)
        out["fp16_disagreement_margins"] = [float(m) for m in margin[dis][:20]]
    return out


def environment() -> dict[str, Any]:
    """Hardware and versions, named in every report."""
    from t2t_vit.env import host_info

    return host_info()