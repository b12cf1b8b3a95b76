"""Accuracy parity: every backend and precision on exactly the same batches, against PyTorch fp32.

::

    python -m engines.parity --model t2t_vit_14 --checkpoint ckpt.pth --data /imagenet/val [--limit 5000]
    make parity MODEL=t2t_vit_14 CHECKPOINT=ckpt.pth DATA=/imagenet/val LIMIT=5000

One :class:`t2t_vit.data.ImageBatcher` (the model's eval transform, fp32 inputs, last batch not padded)
feeds every runner batch by batch, so all backends see the same tensors: PyTorch fp32 (the reference),
PyTorch autocast (bf16 on CPU, fp16 on CUDA), ONNX Runtime on ``<out>/<model>.{fp32,fp16,int8}.onnx``
(CUDA provider when present, else CPU) and TensorRT engines ``<out>/<model>.<precision>.engine`` when
TensorRT and a GPU are present. A backend that cannot run is reported as skipped with the reason.

Per backend: top-1, top-5, delta top-1 vs the reference (points), top-1 agreement with the reference,
mean/max |delta logit|, mean KL(reference softmax || backend softmax), images/s (inference calls only,
first batch excluded as warm-up; a by-product, not a benchmark: use ``make bench`` for timings).
Per-precision thresholds on |delta top-1| and agreement decide the exit code (0 pass, 1 fail, 2 error).

Writes under ``--out``: ``parity-<model>.json`` / ``.md`` / ``.png`` and
``parity-<model>-disagreements.csv`` (images where any backend's top-1 differs from the reference).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engines.runners import OnnxRuntimeRunner, Runner, RunnerError, TorchRunner, read_onnx_metadata
from t2t_vit.env import host_info
from t2t_vit.files import atomic_write, atomic_write_json, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BACKEND_KEYS",
    "ParityError",
    "Thresholds",
    "BackendResult",
    "ParityStats",
    "run_parity",
    "get_args_parser",
    "main",
]

# (max |delta top-1| in points, min top-1 agreement in %) per precision. fp32 must be identical;
# reduced precisions may move a few borderline images. bf16 (PyTorch autocast) keeps only 8 mantissa
# bits, so it gets more room than fp16.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float | None]] = {
    "fp32": (0.0, 99.9),
    "fp16": (0.1, None),
    "bf16": (0.5, None),
    "int8": (1.0, None),
}
BACKEND_KEYS = ("pytorch-fp32", "pytorch-autocast", "ort-fp32", "ort-fp16", "ort-int8",
                "trt-fp32", "trt-fp16", "trt-int8")
FAMILIES = {"pytorch": ("pytorch-fp32", "pytorch-autocast"), "ort": ("ort-fp32", "ort-fp16", "ort-int8"),
            "trt": ("trt-fp32", "trt-fp16", "trt-int8")}
ONNX_PRECISIONS = ("fp32", "fp16", "int8")


class ParityError(RuntimeError):
    """A parity run that cannot be set up as asked; the message says how to fix it."""


@dataclass
class Thresholds:
    """Pass/fail limits per precision; a precision missing here passes on any delta."""

    max_delta_top1: dict[str, float] = field(default_factory=lambda: {k: v[0] for k, v in DEFAULT_THRESHOLDS.items()})
    min_agreement: dict[str, float] = field(
        default_factory=lambda: {k: v[1] for k, v in DEFAULT_THRESHOLDS.items() if v[1] is not None})

    def check(self, precision: str, delta_top1: float, agreement: float) -> list[str]:
        """Reasons this result fails (empty when it passes)."""
        why = []
        lim = self.max_delta_top1.get(precision)
        # A tiny tolerance: percentages of integer counts are not exact in binary floating point.
        if lim is not None and not (abs(delta_top1) <= lim + 1e-9):
            why.append(f"|delta top-1| {abs(delta_top1):.3f} > {lim:g} points")
        agr = self.min_agreement.get(precision)
        if agr is not None and not (agreement >= agr - 1e-9):
            why.append(f"agreement {agreement:.3f}% < {agr:g}%")
        return why

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs_delta_top1_points": dict(self.max_delta_top1), "min_agreement_percent": dict(self.min_agreement)}


# ----------------------------------------------------------------------------------------------------
# Streaming statistics (the full logits of ImageNet val for 8 backends would not fit in memory)
# ----------------------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


class ParityStats:
    """Accumulates one backend's metrics batch by batch."""

    def __init__(self) -> None:
        self.n = 0
        self.correct1 = 0
        self.correct5 = 0
        self.agree = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.n_elems = 0
        self.sum_kl = 0.0
        self.nonfinite = 0
        self.seconds = 0.0
        self.timed_images = 0
        self.preds: list[np.ndarray] = []

    def update(self, logits: np.ndarray, labels: np.ndarray, ref: np.ndarray | None,
               seconds: float | None = None) -> None:
        k = min(5, logits.shape[1])
        finite = np.isfinite(logits).all(axis=1)
        self.nonfinite += int((~finite).sum())
        safe = np.where(np.isfinite(logits), logits, -np.inf)
        top1 = safe.argmax(axis=1)
        topk = np.argsort(-safe, axis=1, kind="stable")[:, :k]
        self.n += len(labels)
        self.correct1 += int((top1 == labels).sum())
        self.correct5 += int((topk == labels[:, None]).any(axis=1).sum())
        self.preds.append(top1.astype(np.int64))
        if ref is not None:
            self.agree += int((top1 == ref.argmax(axis=1)).sum())
            diff = np.abs(logits.astype(np.float64) - ref.astype(np.float64))
            self.sum_abs += float(diff.sum())
            self.max_abs = max(self.max_abs, float(diff.max()) if diff.size else 0.0)
            self.n_elems += diff.size
            lp, lq = _log_softmax(ref), _log_softmax(logits)
            self.sum_kl += float((np.exp(lp) * (lp - lq)).sum())
        if seconds is not None:
            self.seconds += seconds
            self.timed_images += len(labels)

    @property
    def predictions(self) -> np.ndarray:
        return np.concatenate(self.preds) if self.preds else np.zeros(0, np.int64)

    def summary(self, reference: "ParityStats | None") -> dict[str, Any]:
        n = max(self.n, 1)
        out: dict[str, Any] = {
            "images": self.n,
            "top1": 100.0 * self.correct1 / n,
            "top5": 100.0 * self.correct5 / n,
            "correct_top1": self.correct1,
            "images_per_s": (self.timed_images / self.seconds) if self.seconds > 0 else None,
            "nonfinite_images": self.nonfinite,
        }
        if reference is not None:
            out.update({
                "delta_top1": out["top1"] - 100.0 * reference.correct1 / max(reference.n, 1),
                "agreement": 100.0 * self.agree / n,
                "disagreements": self.n - self.agree,
                "mean_abs_logit_delta": self.sum_abs / max(self.n_elems, 1),
                "max_abs_logit_delta": self.max_abs,
                "mean_kl": self.sum_kl / n,
            })
        return out


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------
@dataclass
class BackendSpec:
    """A backend that may run: how to build its runner (device-free) and whether it can run here."""

    key: str
    family: str
    precision: str
    artifact: str | None
    make: Callable[[], Runner] | None
    skip_reason: str = ""


@dataclass
class BackendResult:
    key: str
    name: str
    family: str
    precision: str
    status: str  # reference | pass | fail | skipped | error
    reason: str = ""
    artifact: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "family": self.family, "precision": self.precision,
                "status": self.status, "reason": self.reason, "artifact": self.artifact, **self.metrics}


def parse_backends(value: str | Sequence[str] | None) -> list[str]:
    """Selection keys from a comma list of keys (``ort-fp16``) or families (``pytorch``, ``ort``, ``trt``)."""
    if value is None or value == "" or value == "all":
        return list(BACKEND_KEYS)
    items = value.split(",") if isinstance(value, str) else list(value)
    keys: list[str] = []
    for item in (i.strip().lower() for i in items if i.strip()):
        if item in FAMILIES:
            keys.extend(FAMILIES[item])
        elif item in BACKEND_KEYS:
            keys.append(item)
        else:
            raise ParityError(f"unknown backend {item!r}; choose from {', '.join(BACKEND_KEYS)} "
                              f"or the families {', '.join(FAMILIES)} (comma separated)")
    if "pytorch-fp32" not in keys:
        keys.insert(0, "pytorch-fp32")  # the reference always runs
    return list(dict.fromkeys(keys))


def engine_path(out: Path, model_name: str, precision: str) -> Path:
    """Where ``make engine`` puts the TensorRT engine of a precision."""
    return out / f"{model_name}.{precision}.engine"


def _tensorrt_runner_class() -> tuple[Any, str]:
    try:
        from engines.trt_runtime import TensorRTRunner
    except ImportError as e:
        return None, f"engines.trt_runtime is not importable ({e})"
    ok, why = TensorRTRunner.availability()
    return (TensorRTRunner, "") if ok else (None, why)


def _sha_field(meta: dict[str, str]) -> str:
    v = (meta.get("checkpoint_sha256") or "").strip().lower()
    # The exporter writes "none (random weights)" when it had no checkpoint.
    return "" if (not v or v.startswith(("none", "null", "random"))) else v


def _artifact_metadata(spec: BackendSpec) -> dict[str, str]:
    """The export metadata of an ONNX file, or of the ONNX file an engine was built from (its sidecar)."""
    if spec.family == "onnxruntime":
        return read_onnx_metadata(spec.artifact)
    try:
        from engines.sidecar import read_sidecar

        return dict(read_sidecar(spec.artifact).get("onnx_metadata") or {})
    except Exception as e:  # noqa: BLE001 - the runner reports an unreadable sidecar properly on start
        _logger.debug("no sidecar metadata for %s: %s", spec.artifact, e)
        return {}


def _onnx_mismatch(meta: dict[str, str], model: torch.nn.Module, data_cfg: Any, ckpt_sha: str) -> str:
    """Why an exported file does not belong to this model/checkpoint ('' when it does)."""
    from t2t_vit.data import DataConfig, DataError

    onnx_sha = _sha_field(meta)
    if ckpt_sha and onnx_sha and onnx_sha != ckpt_sha:
        return (f"exported from checkpoint sha256 {onnx_sha[:12]}, not {ckpt_sha[:12]} of --checkpoint; "
                f"re-run `make onnx`/`make calib` with the same CHECKPOINT")
    if onnx_sha and not ckpt_sha:
        return (f"exported from a checkpoint (sha256 {onnx_sha[:12]}) but parity runs without --checkpoint; "
                f"pass the same CHECKPOINT=")
    if meta.get("num_classes") and int(meta["num_classes"]) != int(model.num_classes):
        return f"has {meta['num_classes']} classes, the model {model.num_classes}; re-export"
    try:
        theirs = DataConfig.from_metadata(meta)
    except DataError:
        return ""  # older files without a data config: nothing to compare, the batcher decides
    if theirs != data_cfg:
        return f"exported with data config {theirs.as_dict()}, the model's is {data_cfg.as_dict()}; re-export"
    return ""


def plan_backends(keys: Sequence[str], model: torch.nn.Module, model_name: str, out: Path, device: str,
                  provider: str, data_cfg: Any, ckpt_sha: str, threads: int | None = None,
                  ) -> tuple[BackendSpec, list[BackendSpec]]:
    """The reference and the other backends, each with a runner factory or a skip reason."""
    dev = device.split(":")[0]
    reference = BackendSpec("pytorch-fp32", "pytorch", "fp32", None,
                            lambda: TorchRunner(model, device=device, name=f"pytorch-{dev}-fp32"))
    specs: list[BackendSpec] = []
    if "pytorch-autocast" in keys:
        dtype = torch.bfloat16 if dev == "cpu" else torch.float16
        prec = "bf16" if dtype is torch.bfloat16 else "fp16"
        specs.append(BackendSpec("pytorch-autocast", "pytorch", prec, None,
                                 lambda: TorchRunner(model, device=device, autocast_dtype=dtype)))
    ort_ok, ort_why = OnnxRuntimeRunner.availability(provider)
    for prec in ONNX_PRECISIONS:
        key = f"ort-{prec}"
        if key not in keys:
            continue
        path = out / f"{model_name}.{prec}.onnx"
        spec = BackendSpec(key, "onnxruntime", prec, str(path), None)
        make_hint = "make onnx" if prec != "int8" else "make calib"
        if not ort_ok:
            spec.skip_reason = ort_why
        elif not path.is_file():
            spec.skip_reason = f"{path} not found (create it with `{make_hint}` and the same MODEL/OUT)"
        else:
            spec.make = (lambda p=path: OnnxRuntimeRunner(p, provider=provider, threads=threads))
        specs.append(spec)
    trt_keys = [k for k in keys if k.startswith("trt-")]
    if trt_keys:
        trt_cls, trt_why = _tensorrt_runner_class()
        for key in trt_keys:
            prec = key.split("-", 1)[1]
            path = engine_path(out, model_name, prec)
            spec = BackendSpec(key, "tensorrt", prec, str(path), None)
            if trt_cls is None:
                spec.skip_reason = trt_why
            elif not path.is_file():
                spec.skip_reason = f"{path} not found (build it with `make engine PRECISION={prec}`)"
            else:
                spec.make = (lambda p=path: trt_cls(p))
            specs.append(spec)
    return reference, specs


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def _auto_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _auto_provider(provider: str) -> str:
    if provider == "auto":
        return "cuda" if OnnxRuntimeRunner.availability("cuda")[0] else "cpu"
    return provider


def run_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected backend on the same batches and write the report files; returns the report."""
    from tqdm import tqdm

    from t2t_vit.checkpoint import build_model, file_sha256
    from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset
    from t2t_vit.imagenet import model_class_names, resolve_eval_set

    keys = parse_backends(args.backends)
    thresholds = Thresholds()
    for prec, val in (args.max_delta_top1 or []):
        thresholds.max_delta_top1[prec] = val
    for prec, val in (args.min_agreement or []):
        thresholds.min_agreement[prec] = val

    out = Path(args.out or f"artifacts/{args.model}")
    device, provider = _auto_device(args.device), _auto_provider(args.provider)
    if args.checkpoint is None:
        warnings.warn(
            f"NO --checkpoint: {args.model} gets RANDOM weights (seed {args.seed}); accuracies are meaningless "
            f"and ONNX files exported from other random weights will disagree. Pass CHECKPOINT=...",
            stacklevel=2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint, img_size=args.img_size).eval()
    ckpt_sha = file_sha256(args.checkpoint) if args.checkpoint else ""
    data_cfg = DataConfig.from_model(model)

    evalset = resolve_eval_set(args.data, class_names=model_class_names(model), num_classes=model.num_classes,
                               labels_file=args.labels)
    samples = evalset.samples
    if args.limit:
        samples = class_balanced_subset(samples, int(args.limit), seed=args.seed)
    batcher = ImageBatcher(samples, data_cfg, batch_size=args.batch_size, num_workers=args.workers)

    reference, specs = plan_backends(keys, model, args.model, out, device, provider, data_cfg, ckpt_sha,
                                     threads=args.threads)
    results: dict[str, BackendResult] = {}
    for spec in specs:
        if spec.make is None:
            results[spec.key] = BackendResult(spec.key, spec.key, spec.family, spec.precision, "skipped",
                                              spec.skip_reason, spec.artifact)
        elif spec.artifact:
            why = _onnx_mismatch(_artifact_metadata(spec), model, data_cfg, ckpt_sha)
            if why:
                results[spec.key] = BackendResult(spec.key, spec.key, spec.family, spec.precision, "error",
                                                  f"{spec.artifact}: {why}", spec.artifact)

    stats: dict[str, ParityStats] = {}
    runners: dict[str, Runner] = {}
    labels_all: list[np.ndarray] = []
    paths_all: list[str] = []
    with ExitStack() as stack:
        ref_runner = stack.enter_context(reference.make())
        stats["pytorch-fp32"] = ParityStats()
        for spec in specs:
            if spec.key in results:
                continue
            try:
                runner = spec.make()
                stack.enter_context(runner)
            except (RunnerError, OSError, RuntimeError, ValueError) as e:
                results[spec.key] = BackendResult(spec.key, spec.key, spec.family, spec.precision, "error",
                                                  f"could not start: {e}", spec.artifact)
                continue
            runners[spec.key] = runner
            stats[spec.key] = ParityStats()

        n_batches = len(batcher)
        bar = tqdm(batcher, total=n_batches, desc=f"parity {args.model}", unit="batch",
                   disable=args.no_progress or None)
        for i, (images, labels, paths) in enumerate(bar):
            y = labels.numpy()
            # First batch is warm-up (session/graph initialisation) unless it is the only one.
            timed = i > 0 or n_batches == 1
            t0 = time.perf_counter()
            ref_logits = ref_runner.infer(images)
            dt = time.perf_counter() - t0
            stats["pytorch-fp32"].update(ref_logits, y, None, dt if timed else None)
            for key, runner in runners.items():
                t0 = time.perf_counter()
                logits = runner.infer(images)
                dt = time.perf_counter() - t0
                if logits.shape != ref_logits.shape:
                    raise ParityError(f"{runner.name} returned logits of shape {logits.shape}, the reference "
                                      f"{ref_logits.shape}; is {getattr(runner, 'path', '')} from this model?")
                stats[key].update(logits, y, ref_logits, dt if timed else None)
            labels_all.append(y)
            paths_all.extend(paths)
            ref_n = stats["pytorch-fp32"].n
            bar.set_postfix(top1=f"{100.0 * stats['pytorch-fp32'].correct1 / max(ref_n, 1):.1f}")
        bar.close()
        ref_name = ref_runner.name
        names = {k: r.name for k, r in runners.items()}
        describes = {k: r.describe() for k, r in runners.items()}

    if not labels_all:
        raise ParityError("no readable images in the selection")
    ref_stats = stats["pytorch-fp32"]
    results_ordered: list[BackendResult] = [BackendResult("pytorch-fp32", ref_name, "pytorch", "fp32", "reference",
                                                          metrics=ref_stats.summary(None))]
    results_ordered[0].metrics.update({"delta_top1": 0.0, "agreement": 100.0})
    for spec in specs:
        if spec.key in results:
            results_ordered.append(results[spec.key])
            continue
        m = stats[spec.key].summary(ref_stats)
        fails = thresholds.check(spec.precision, m["delta_top1"], m["agreement"])
        if m["nonfinite_images"]:
            fails.append(f"{m['nonfinite_images']} images with non-finite logits")
        res = BackendResult(spec.key, names[spec.key], spec.family, spec.precision, "fail" if fails else "pass",
                            "; ".join(fails), spec.artifact, m)
        res.metrics["runner"] = describes[spec.key]
        results_ordered.append(res)

    labels_np = np.concatenate(labels_all)
    ref_pred = ref_stats.predictions
    preds = {r.key: stats[r.key].predictions for r in results_ordered if r.key in stats and r.key != "pytorch-fp32"}
    failed = [r for r in results_ordered if r.status in ("fail", "error")]
    stem = f"parity-{args.model}"
    outputs = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "chart": out / f"{stem}.png",
               "disagreements": out / f"{stem}-disagreements.csv"}
    if args.save_predictions:
        outputs["predictions"] = out / f"{stem}-predictions.csv"

    report: dict[str, Any] = {
        "tool": "engines.parity",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "checkpoint_sha256": ckpt_sha or None,
        "num_classes": int(model.num_classes),
        "data": {"root": str(evalset.root), "labels_file": evalset.labels_file, "layout": evalset.layout,
                 "class_mapping": evalset.mapping, "images_found": len(evalset.samples),
                 "limit": args.limit, "images_evaluated": int(ref_stats.n),
                 "images_unreadable": list(batcher.skipped), "notes": evalset.notes},
        "data_config": data_cfg.as_dict(),
        "batch_size": args.batch_size,
        "device": device,
        "ort_provider": provider,
        "hardware": {**host_info(), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "thresholds": thresholds.as_dict(),
        "reference": ref_name,
        "passed": not failed,
        "backends": [r.as_dict() for r in results_ordered],
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_disagreements(outputs["disagreements"], paths_all, labels_np, ref_pred, preds, results_ordered,
                         evalset.class_names, only_disagreements=True)
    if "predictions" in outputs:
        _write_disagreements(outputs["predictions"], paths_all, labels_np, ref_pred, preds, results_ordered,
                             evalset.class_names, only_disagreements=False)
    _write_chart(outputs["chart"], report)
    atomic_write_text(outputs["markdown"], render_markdown(report))
    atomic_write_json(outputs["json"], _json_safe(report))
    return report


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_disagreements(path: Path, paths: list[str], labels: np.ndarray, ref_pred: np.ndarray,
                         preds: dict[str, np.ndarray], results: list[BackendResult], class_names: list[str],
                         only_disagreements: bool) -> None:
    names = {r.key: r.name for r in results}

    def cname(i: int) -> str:
        return class_names[i] if 0 <= i < len(class_names) else str(i)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "label_name", "reference", "reference_name",
                *[names[k] for k in preds], *[f"{names[k]}_name" for k in preds]])
    for i, p in enumerate(paths):
        row_preds = [int(v[i]) for v in preds.values()]
        if only_disagreements and all(v == ref_pred[i] for v in row_preds):
            continue
        w.writerow([p, int(labels[i]), cname(int(labels[i])), int(ref_pred[i]), cname(int(ref_pred[i])),
                    *row_preds, *[cname(v) for v in row_preds]])
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (a table per run, skipped backends with reasons)."""
    hw = report["hardware"]
    gpu = f", GPU {hw['gpu']['name']}" if hw.get("gpu") else ""
    d = report["data"]
    lines = [
        f"# Parity: {report['model']}",
        "",
        f"- checkpoint: `{report['checkpoint'] or 'none (random weights)'}`",
        f"- data: `{d['root']}` ({d['layout']}; {d['class_mapping']}), {d['images_evaluated']} images"
        + (f" (class-balanced subset of {d['images_found']}, LIMIT={d['limit']})" if d["limit"] else ""),
        f"- reference: {report['reference']}; batch size {report['batch_size']}",
        f"- hardware: {hw['cpu']} ({hw['cpu_cores']} cores){gpu}; torch {hw['torch']}, onnxruntime {hw.get('onnxruntime')}"
        + (f"; load average {hw['load_average_1min']:.1f} at the end (images/s shares the CPU with other work)"
           if (hw.get("load_average_1min") or 0) > (hw.get("cpu_cores") or 1) else ""),
        f"- result: **{'PASS' if report['passed'] else 'FAIL'}**",
        "",
        "| backend | precision | top-1 | top-5 | Δ top-1 | agreement | mean \\|Δlogit\\| | max \\|Δlogit\\| | KL "
        "| images/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for b in report["backends"]:
        if b["status"] in ("skipped", "error") and "top1" not in b:
            skipped.append(b)
            continue
        lines.append(
            f"| {b['name']} | {b['precision']} | {_fmt(b.get('top1'))} | {_fmt(b.get('top5'))} | "
            f"{_fmt(b.get('delta_top1'), '+.2f')} | {_fmt(b.get('agreement'))}% | "
            f"{_fmt(b.get('mean_abs_logit_delta'), '.2e')} | {_fmt(b.get('max_abs_logit_delta'), '.2e')} | "
            f"{_fmt(b.get('mean_kl'), '.2e')} | {_fmt(b.get('images_per_s'), '.1f')} | "
            f"{b['status']}{': ' + b['reason'] if b['reason'] else ''} |")
    if skipped:
        lines += ["", "Not evaluated:", ""]
        lines += [f"- {b['key']} ({b['status']}): {b['reason']}" for b in skipped]
    th = report["thresholds"]
    lines += ["", "Thresholds: |Δ top-1| ≤ " + ", ".join(f"{k} {v:g}" for k, v in th["max_abs_delta_top1_points"].items())
              + " points; agreement ≥ " + ", ".join(f"{k} {v:g}%" for k, v in th["min_agreement_percent"].items())
              + ". images/s: inference calls during this run, first batch excluded (not a benchmark).", ""]
    return "\n".join(lines)


def _write_chart(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [b for b in report["backends"] if b.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    colors = {"reference": "#4c72b0", "pass": "#55a868", "fail": "#c44e52"}
    y = np.arange(len(rows))
    ax.barh(y, [b["top1"] for b in rows], color=[colors.get(b["status"], "#8c8c8c") for b in rows])
    ax.set_yticks(y, [b["name"] for b in rows])
    ax.invert_yaxis()
    hi = max(b["top1"] for b in rows) if rows else 100.0
    ax.set_xlim(0, min(100.0, hi * 1.25 + 1))
    for i, b in enumerate(rows):
        label = f"{b['top1']:.2f}" if b["status"] == "reference" else (
            f"{b['top1']:.2f} ({b['delta_top1']:+.2f}, agree {b['agreement']:.1f}%)")
        ax.text(b["top1"], i, " " + label, va="center", fontsize=9)
    ax.set_xlabel("top-1 (%)  [Δ vs PyTorch fp32 in points]")
    ax.set_title(f"Parity {report['model']}: {report['data']['images_evaluated']} images, "
                 f"{'PASS' if report['passed'] else 'FAIL'}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _prec_value(text: str) -> tuple[str, float]:
    try:
        prec, val = text.split("=", 1)
        return prec.strip().lower(), float(val)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRECISION=VALUE (e.g. fp16=0.2), got {text!r}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Accuracy parity of every backend against PyTorch fp32",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="registered model name, e.g. t2t_vit_14")
    p.add_argument("--checkpoint", default=None, help="weights (without: random weights and a loud warning)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: registry/checkpoint)")
    p.add_argument("--out", default=None, help="folder holding the ONNX files/engines and receiving the report "
                                                "(default artifacts/<model>)")
    p.add_argument("--data", required=True, help="ImageNet-style val folder: synset folders, or flat with --labels")
    p.add_argument("--labels", default=None, help="ground truth for a flat folder: LOC_val_solution.csv or "
                                                  "'filename label' lines (0-based)")
    p.add_argument("--limit", type=int, default=None, help="deterministic class-balanced subset of N images")
    p.add_argument("--backends", default=None,
                   help=f"comma list of {', '.join(BACKEND_KEYS)} or families pytorch, ort, trt (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="PyTorch device: auto, cpu, cuda")
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch and ONNX Runtime intra-op threads (default: their own choice)")
    p.add_argument("--max-delta-top1", type=_prec_value, action="append", metavar="PREC=POINTS",
                   help="override the |delta top-1| limit of a precision (repeatable), e.g. int8=0.5")
    p.add_argument("--min-agreement", type=_prec_value, action="append", metavar="PREC=PERCENT",
                   help="override the minimum top-1 agreement of a precision (repeatable), e.g. fp16=99.5")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write every image's top-1 per backend to parity-<model>-predictions.csv")
    p.add_argument("--seed", type=int, default=0, help="subset seed (and random-weight seed without a checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for b in report["backends"]:
        if "top1" in b:
            extra = "" if b["status"] == "reference" else (
                f"  delta {b['delta_top1']:+.2f}  agree {b['agreement']:.2f}%  max|dlogit| {b['max_abs_logit_delta']:.2e}")
            lines.append(f"  {b['name']:<32} top-1 {b['top1']:6.2f}{extra}  [{b['status']}]"
                         + (f" {b['reason']}" if b["reason"] and b["status"] != "pass" else ""))
        else:
            lines.append(f"  {b['key']:<32} {b['status']}: {b['reason']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from t2t_vit.checkpoint import CheckpointError
    from t2t_vit.data import DataError

    try:
        report = run_parity(args)
    except (ParityError, RunnerError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"parity {report['model']} on {report['data']['images_evaluated']} images "
          f"({'PASS' if report['passed'] else 'FAIL'}):")
    print("\n".join(summary_lines(report)))
    print(f"report: {report['outputs']['markdown']} (+ .json, .png, disagreements .csv)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
