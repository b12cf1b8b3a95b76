"""Accuracy and logit comparison: one implementation, one set of key names, percentages everywhere.

Keys (every report uses these):

* ``images``, ``top1``, ``top5`` (percent) against labels;
* against a reference's logits: ``top1_agreement`` (percent of images whose top-1 class equals the
  reference's), ``disagreements`` (count), ``delta_top1`` (points, candidate minus reference),
  ``max_abs_dlogit``, ``mean_abs_dlogit``, ``max_rel_dlogit`` (max |delta| over the reference's logit
  scale, max |logit|), ``mean_kl`` (KL(reference softmax || candidate softmax)), ``nonfinite_images``.

:class:`LogitStats` accumulates them batch by batch (ImageNet val's logits for many backends do not fit
in memory); :func:`compare_logits` is the same computation on whole arrays.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["topk_correct", "LogitStats", "compare_logits", "accuracy"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per sample: the label is among the ``k`` largest logits (k capped at the class count).

    Non-finite logits rank last, so a NaN row is never counted correct by accident.
    """
    k = min(k, logits.shape[1])
    safe = np.where(np.isfinite(logits), logits, -np.inf)
    top = np.argsort(-safe, axis=1, kind="stable")[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


class LogitStats:
    """One backend's metrics, accumulated batch by batch (labels and a reference are both optional)."""

    def __init__(self) -> None:
        self.n = 0
        self.labelled = 0
        self.correct1 = 0
        self.correct5 = 0
        self.agree = 0
        self.compared = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.n_elems = 0
        self.ref_scale = 0.0
        self.sum_kl = 0.0
        self.nonfinite = 0
        self.seconds = 0.0
        self.timed_images = 0
        self._preds: list[np.ndarray] = []

    def update(self, logits: np.ndarray, labels: np.ndarray | None = None, reference: np.ndarray | None = None,
               seconds: float | None = None) -> None:
        logits = np.asarray(logits)
        finite = np.isfinite(logits).all(axis=1)
        self.nonfinite += int((~finite).sum())
        safe = np.where(np.isfinite(logits), logits, -np.inf)
        top1 = safe.argmax(axis=1)
        self._preds.append(top1.astype(np.int64))
        self.n += len(logits)
        if labels is not None:
            labels = np.asarray(labels)
            self.labelled += len(labels)
            self.correct1 += int((top1 == labels).sum())
            self.correct5 += int(topk_correct(logits, labels, 5).sum())
        if reference is not None:
            reference = np.asarray(reference)
            self.compared += len(logits)
            self.agree += int((top1 == reference.argmax(axis=1)).sum())
            diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
            self.sum_abs += float(diff.sum())
            self.max_abs = max(self.max_abs, float(diff.max()) if diff.size else 0.0)
            self.n_elems += diff.size
            self.ref_scale = max(self.ref_scale, float(np.abs(reference).max()) if reference.size else 0.0)
            lp, lq = _log_softmax(reference), _log_softmax(logits)
            self.sum_kl += float((np.exp(lp) * (lp - lq)).sum())
        if seconds is not None:
            self.seconds += seconds
            self.timed_images += len(logits)

    @property
    def predictions(self) -> np.ndarray:
        return np.concatenate(self._preds) if self._preds else np.zeros(0, np.int64)

    def summary(self, reference: "LogitStats | None" = None) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.n, "nonfinite_images": self.nonfinite}
        if self.labelled:
            out.update(top1=100.0 * self.correct1 / self.labelled, top5=100.0 * self.correct5 / self.labelled,
                       correct_top1=self.correct1)
        if self.timed_images:
            out["images_per_s"] = self.timed_images / self.seconds if self.seconds > 0 else None
        if self.compared:
            out.update(
                top1_agreement=100.0 * self.agree / self.compared,
                disagreements=self.compared - self.agree,
                max_abs_dlogit=self.max_abs,
                mean_abs_dlogit=self.sum_abs / max(self.n_elems, 1),
                logit_scale=self.ref_scale,
                max_rel_dlogit=self.max_abs / self.ref_scale if self.ref_scale > 0 else float("inf"),
                mean_kl=self.sum_kl / self.compared,
            )
        if reference is not None and reference.labelled and self.labelled:
            out["delta_top1"] = out["top1"] - 100.0 * reference.correct1 / reference.labelled
        return out


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """The :class:`LogitStats` summary of ``candidate`` against ``reference`` (and ``labels`` when given)."""
    ref, cand = LogitStats(), LogitStats()
    ref.update(reference, labels)
    cand.update(candidate, labels, reference)
    return cand.summary(ref if labels is not None else None)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``images``, ``top1``, ``top5`` (percent) of ``logits`` against ``labels``."""
    s = LogitStats()
    s.update(logits, labels)
    out = s.summary()
    return {k: out[k] for k in ("images", "top1", "top5")}
