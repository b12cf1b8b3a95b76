"""Logits of several ONNX graphs on ONNX Runtime CPU, on the same batches (decoded once)."""
from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Mapping

import numpy as np

from t2t_vit.errors import T2TError
from t2t_vit.runners import OnnxRuntimeRunner

__all__ = ["evaluate_graphs"]


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
        raise T2TError("no images were evaluated (every image of the selection was unreadable)")
    return {k: np.concatenate(v) for k, v in logits.items()}, np.concatenate(labels)
