"""Validate exported graphs on ONNX Runtime's CPU provider against the PyTorch model.

Thresholds: the fp32 graph must match PyTorch to ``FP32_MAX_ABS_DLOGIT`` (1e-4 in logit units; the
report also gives it relative to the logit scale, max |logit|), and the fp16 graph must agree with
the fp32 graph on top-1 for at least ``FP16_MIN_TOP1_AGREEMENT`` percent of the images. Comparisons
use :func:`t2t_vit.metrics.compare_logits` (the keys every report uses).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2t_vit.data import DataConfig, DataError, ImageBatcher, class_balanced_subset, imagenette_root, scan_image_folder
from t2t_vit.graphs import ort_session
from t2t_vit.labels import label_space, model_class_names
from t2t_vit.metrics import accuracy, compare_logits

_logger = logging.getLogger(__name__)

__all__ = [
    "FP32_MAX_ABS_DLOGIT",
    "FP16_MIN_TOP1_AGREEMENT",
    "ort_logits",
    "torch_logits",
    "validation_images",
    "validate_graphs",
]

FP32_MAX_ABS_DLOGIT = 1e-4
FP16_MIN_TOP1_AGREEMENT = 99.5  # percent


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


def validation_images(model: nn.Module, data: str | os.PathLike | None, n: int,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``n`` class-balanced images preprocessed by the model's own eval transform, their labels in the
    model's label space (None when the folders do not map onto it), and a description of the source.

    Without image data (``data`` None and no development data beside the checkout) the images are
    N(0, 1) noise with a warning: the graphs are still compared, but not on real inputs.
    """
    default = imagenette_root()
    root = Path(data) if data else (default / "val" if default else None)
    if root is not None and (root / "val").is_dir():  # a dataset root (train/ and val/ inside), as for training
        root = root / "val"
    cfg = DataConfig.from_model(model)
    if root is None:
        import warnings

        warnings.warn("no validation images (no --data, no development data): validating on random N(0,1) inputs")
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g), None,
                "random N(0,1) inputs (no image data)")
    _, folders = scan_image_folder(root)
    try:
        index, _ = label_space(folders, model_class_names(model), int(model.num_classes))
    except DataError as e:  # images still compare the graphs; only accuracy against labels is lost
        _logger.warning("validation images are unlabelled for this model: %s", e)
        index = None
    samples, _ = scan_image_folder(root, index)
    subset = class_balanced_subset(samples, n, seed=seed, what="--val-images")
    images, labels, _ = ImageBatcher(subset, cfg, batch_size=64).tensor()
    source = (f"{root} ({len(images)} class-balanced images, seed {seed}; {cfg.interpolation} resize "
              f"{cfg.resize_size}, center crop {cfg.img_size})")
    return images, (labels if index is not None else None), source


def validate_graphs(model: nn.Module, fp32_path: str | os.PathLike, fp16_path: str | os.PathLike,
                    images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 50,
                    source: str = "", threads: int | None = None,
                    contrasts: dict[str, str | os.PathLike] | None = None) -> dict[str, Any]:
    """Compare PyTorch fp32, ORT fp32 and ORT fp16 logits; thresholds applied, ``passed`` overall.

    ``contrasts``: more graphs (name -> path) compared with ORT fp32 for information, without a threshold
    (the export report uses it for the fp16 graph without the fp32 island: why the island exists)."""
    ref = torch_logits(model, images, batch_size)
    l32 = ort_logits(ort_session(fp32_path, threads=threads), images, batch_size)
    l16 = ort_logits(ort_session(fp16_path, threads=threads), images, batch_size)
    c32 = {"name": "ORT fp32 vs PyTorch fp32", **compare_logits(ref, l32)}
    c32.update(threshold=f"max abs dlogit <= {FP32_MAX_ABS_DLOGIT:g}",
               passed=c32["nonfinite_images"] == 0 and c32["max_abs_dlogit"] <= FP32_MAX_ABS_DLOGIT)
    c16 = {"name": "ORT fp16 vs ORT fp32", **compare_logits(l32, l16)}
    c16.update(threshold=f"top-1 agreement >= {FP16_MIN_TOP1_AGREEMENT:g}%",
               passed=c16["nonfinite_images"] == 0 and c16["top1_agreement"] >= FP16_MIN_TOP1_AGREEMENT)
    c16t = {"name": "ORT fp16 vs PyTorch fp32", **compare_logits(ref, l16)}
    extra = [{"name": f"{name} vs ORT fp32", **compare_logits(l32, ort_logits(ort_session(path, threads=threads),
                                                                            images, batch_size)),
              "threshold": "(for contrast)", "passed": None}
             for name, path in (contrasts or {}).items()]
    out: dict[str, Any] = {
        "n_images": int(len(images)),
        "source": source,
        "logit_scale": float(np.abs(ref).max()),
        "comparisons": [c32, c16, c16t, *extra],
        "passed": bool(c32["passed"] and c16["passed"]),
    }
    if labels is not None:
        y = labels.numpy()
        out["labels_top1"] = {k: accuracy(v, y)["top1"] for k, v in
                              (("PyTorch fp32", ref), ("ORT fp32", l32), ("ORT fp16", l16))}
    # The fp32-vs-fp16 top-1 margin: a disagreement on a near-tie (random weights) is not an error.
    top2 = np.sort(l32, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    out["fp32_top1_margin_median"] = float(np.median(margin))
    if c16["disagreements"]:
        dis = l32.argmax(1) != l16.argmax(1)
        out["fp16_disagreement_margins"] = [float(m) for m in margin[dis][:20]]
    return out
