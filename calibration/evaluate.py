"""Accuracy of ONNX graphs on ONNX Runtime CPU, compared with the fp32 graph, and the report files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from t2t_vit.files import atomic_write_text

__all__ = ["topk_correct", "compare_logits", "evaluate_graphs", "hardware_info", "write_json", "write_text"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per sample: the label is among the ``k`` largest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def compare_logits(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """top-1/top-5 (percent) of ``logits``; with ``reference`` also top-1 agreement and |delta logit|."""
    out = {
        "images": int(len(labels)),
        "top1": float(100.0 * topk_correct(logits, labels, 1).mean()),
        "top5": float(100.0 * topk_correct(logits, labels, 5).mean()),
    }
    if reference is not None:
        diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
        out.update({
            "top1_agreement": float(100.0 * (logits.argmax(1) == reference.argmax(1)).mean()),
            "mean_abs_dlogit": float(diff.mean()),
            "max_abs_dlogit": float(diff.max()),
        })
    return out


def evaluate_graphs(graphs: Mapping[str, str | os.PathLike], batches, threads: int | None = None,
                    total: int | None = None, progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Logits of every graph on the same batches (decoded once), and the labels.

    Args:
        graphs: report name -> ONNX path.
        batches: iterable of ``(images, labels, paths)`` (an :class:`t2t_vit.data.ImageBatcher`, or
            chunks of a cached tensor).
        threads: ONNX Runtime intra-op threads (None: all cores).
        total: number of batches, for the progress bar.
    """
    from contextlib import ExitStack

    from engines.runners import OnnxRuntimeRunner

    logits: dict[str, list[np.ndarray]] = {k: [] for k in graphs}
    labels: list[np.ndarray] = []
    with ExitStack() as stack:
        runners = {k: stack.enter_context(OnnxRuntimeRunner(p, provider="cpu", threads=threads, name=k))
                   for k, p in graphs.items()}
        it = batches
        if progress:
            from tqdm import tqdm

            it = tqdm(batches, total=total, desc=f"evaluate {len(graphs)} graphs", unit="batch")
        for images, y, _ in it:
            labels.append(np.asarray(y))
            for k, r in runners.items():
                logits[k].append(np.asarray(r.infer(images), dtype=np.float32))
    if not labels:
        raise ValueError("no images were evaluated")
    return {k: np.concatenate(v) for k, v in logits.items()}, np.concatenate(labels)


def hardware_info() -> dict[str, Any]:
    """CPU model, core count, AVX-512 VNNI, library versions (t2t_vit.env.host_info; in every report)."""
    from t2t_vit.env import host_info

    return host_info()


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Atomic text write (temp file in the same folder, then rename)."""
    return atomic_write_text(path, text)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 and v != 0 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
