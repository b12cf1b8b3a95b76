"""Accuracy parity: every backend and precision on exactly the same batches, against PyTorch fp32.

::

    python -m evaluation.parity --model t2t_vit_14 --checkpoint ckpt.pth --data /imagenet/val [--limit 5000]
    make parity MODEL=t2t_vit_14 CHECKPOINT=ckpt.pth DATA=/imagenet/val LIMIT=5000

One :class:`t2t_vit.data.ImageBatcher` (the model's eval transform, fp32 inputs, last batch not padded)
feeds every runner batch by batch, so all backends see the same tensors: PyTorch fp32 (the reference),
PyTorch autocast (bf16 on CPU, fp16 on CUDA), ONNX Runtime on ``<out>/<model>.{fp32,fp16,int8,int8-cpu,fp8}.onnx``
(CUDA provider when present, else CPU; on the fp8 graph an emulation, marked so in the report:
:data:`t2t_vit.backends.FP8_EMULATION`) and TensorRT engines ``<out>/<model>.<precision>.engine`` when
TensorRT and a GPU are present (``tensorrt-fp8``: a GPU of the compute capability its sidecar or graph
records, SM 8.9+). A backend that cannot run is reported as skipped with the reason (listed
once per reason in the report and the summary). A run where every backend asked for was skipped compared
nothing and is refused (exit 2, one line with each backend's reason), as is a ``--require``'d backend
that cannot run; a run asked only for the reference is reported as ``REFERENCE ONLY``, not as a pass. An
ONNX graph or engine whose recorded model, precision or checkpoint is not this run's is refused before
anything runs (:func:`t2t_vit.graphs.graph_mismatch`, the check every stage shares).
Backends are named as their runners (``onnxruntime-cpu-int8``, ``tensorrt-fp16``; ``--backends`` takes
names or prefixes, :func:`t2t_vit.backends.select_backends`); their runners come from the one factory,
:func:`engines.backends.resolve_backend`.

Per backend (:mod:`t2t_vit.metrics` keys): top-1, top-5, delta top-1 vs the reference (points), top-1
agreement with the reference (percent), mean/max |delta logit|, mean KL(reference softmax || backend
softmax), images/s (inference calls only, first batch excluded as warm-up; a by-product, not a
benchmark: use ``make bench`` for timings). Per-precision thresholds on |delta top-1| and agreement
decide the exit code (0 pass, 1 fail, 2 error).

Writes under ``--out``: ``parity-<model>.json`` / ``.md`` / ``.png`` and
``parity-<model>-disagreements.csv`` (images where any backend's top-1 differs from the reference).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engines.backends import Skip, resolve_backend
from engines.trt_runtime import TensorRTRunner
from t2t_vit.artifacts import ENGINE_PRECISIONS, GRAPH_PRECISIONS, default_out, make_hint
from t2t_vit.backends import BackendSpec, select_backends
from t2t_vit.checkpoint import build_model
from t2t_vit.cli import add_limit_arg, add_run_args, add_stage_args, apply_threads, run_command
from t2t_vit.data import DataConfig, DataError, ImageBatcher, class_balanced_subset
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, atomic_write_text, file_sha256
from t2t_vit.graphs import GraphError, graph_mismatch
from t2t_vit.labels import model_class_names, readable_class, resolve_eval_set, shifted_label_check
from t2t_vit.metrics import LogitStats
from t2t_vit.reports import host_line, pyplot, report_header, write_report
from t2t_vit.runners import OnnxRuntimeRunner, Runner

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ParityError",
    "Thresholds",
    "BackendResult",
    "parity_backends",
    "ParityPlan",
    "ParityRun",
    "plan_parity",
    "resolve_runners",
    "execute_parity",
    "parity_report",
    "run_parity",
    "get_args_parser",
    "main",
]

# (max |delta top-1| in points, min top-1 agreement in %) per precision. fp32 must be identical;
# reduced precisions may move a few borderline images. bf16 (PyTorch autocast) keeps only 8 mantissa
# bits, so it gets more room than fp16. fp8 quantizes the same tensors as int8 (one placement, the same
# calibrated ranges), so it gets int8's budget (docs/parity.md says why).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float | None]] = {
    "fp32": (0.0, 99.9),
    "fp16": (0.1, None),
    "bf16": (0.5, None),
    "int8": (1.0, None),
    "int8-cpu": (1.0, None),
    "fp8": (1.0, None),
}
ONNX_PRECISIONS = GRAPH_PRECISIONS


class ParityError(T2TError, RuntimeError):
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
# Backends
# ----------------------------------------------------------------------------------------------------
@dataclass
class BackendResult:
    name: str
    family: str
    precision: str
    status: str  # reference | pass | fail | skipped | error
    reason: str = ""
    artifact: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    emulation: str = ""  # what an emulated backend (ONNX Runtime on the fp8 graph) does and does not model

    @classmethod
    def not_run(cls, spec: BackendSpec, status: str, reason: str, artifact: str | None) -> "BackendResult":
        return cls(spec.name, spec.family, spec.precision, status, reason, artifact, emulation=spec.emulation)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "precision": self.precision,
                "status": self.status, "reason": self.reason, "artifact": self.artifact,
                "emulated": bool(self.emulation), "emulation": self.emulation, **self.metrics}


def autocast_precision(device: str) -> str:
    return "bf16" if str(device).startswith("cpu") else "fp16"


def parity_backends(device: str, provider: str) -> list[BackendSpec]:
    """Every backend parity knows on this device/provider, reference first (the --backends vocabulary)."""
    dev = str(device).split(":")[0]
    return ([BackendSpec("pytorch", dev, "fp32"), BackendSpec("pytorch", dev, autocast_precision(dev))]
            + [BackendSpec("onnxruntime", provider, p) for p in ONNX_PRECISIONS]
            + [BackendSpec("tensorrt", "cuda", p) for p in ENGINE_PRECISIONS])


def _artifact_metadata(runner: Runner) -> dict[str, str]:
    """The export metadata of an ONNX file, or of the ONNX file an engine was built from (its sidecar)."""
    if isinstance(runner, TensorRTRunner):
        return dict(runner.sidecar.get("onnx_metadata") or {})
    return dict(getattr(runner, "metadata", None) or {})


def _onnx_mismatch(meta: dict[str, str], model: torch.nn.Module, model_name: str, precision: str,
                   data_cfg: Any, ckpt_sha: str) -> str:
    """Why an exported file does not belong to this model/precision/checkpoint ('' when it does)."""
    # Model, precision and checkpoint: the check every stage shares. Parity's reference is the PyTorch model
    # with --checkpoint's weights (random without one), so a graph from other weights is always refused.
    why = graph_mismatch(meta, model=model_name, precision=precision, checkpoint_sha=ckpt_sha)
    if why:
        return why
    if meta.get("num_classes") and int(meta["num_classes"]) != int(model.num_classes):
        return f"has {meta['num_classes']} classes, the model {model.num_classes}"
    try:
        theirs = DataConfig.from_metadata(meta)
    except DataError:
        return ""  # older files without a data config: nothing to compare, the batcher decides
    if theirs != data_cfg:
        return f"was exported with data config {theirs.as_dict()}, the model's is {data_cfg.as_dict()}"
    return ""


def _fix_hint(spec: BackendSpec, model_name: str, checkpoint: str | None, out: Path) -> str:
    """The make command(s) that make the artifact a backend needs from the right weights."""
    graph = make_hint(spec.precision, model_name, checkpoint, out)
    if spec.family == "tensorrt":
        return f"{graph}, then `make engine PRECISION={spec.precision}` with the same MODEL/CHECKPOINT/OUT"
    return graph


def check_artifacts(runners: dict[BackendSpec, Runner], model: torch.nn.Module, model_name: str, data_cfg: Any,
                    ckpt_sha: str, checkpoint: str | None, out: Path) -> None:
    """Refuse, before anything runs, an ONNX graph or engine that is not this model's at the backend's
    precision with --checkpoint's weights (its recorded metadata says so).

    Raises:
        ParityError: one line naming the file, what is wrong and the make command that fixes it.
    """
    for spec, runner in runners.items():
        if spec.runtime == "pytorch":
            continue
        why = _onnx_mismatch(_artifact_metadata(runner), model, model_name, spec.precision, data_cfg, ckpt_sha)
        if why:
            raise ParityError(f"{spec.name}: {spec.artifact(out, model_name)} {why}: re-create it with "
                              f"{_fix_hint(spec, model_name, checkpoint, out)}, or leave it out (BACKENDS=)")


def not_run_groups(results: Sequence[BackendResult]) -> list[dict[str, Any]]:
    """Asked-for backends that did not run, grouped by reason (a reason shared by several backends, such as
    TensorRT missing, is listed once): ``[{"backends": [...], "status": ..., "reason": ...}]``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.status in ("skipped", "error") and "top1" not in r.metrics:
            groups.setdefault((r.status, r.reason), []).append(r.name)
    return [{"backends": names, "status": status, "reason": reason} for (status, reason), names in groups.items()]


def _not_run_line(groups: Sequence[dict[str, Any]]) -> str:
    return "; ".join(f"{', '.join(g['backends'])}: {g['reason']}" for g in groups)


def check_ran(asked: Sequence[str], required: Sequence[str], results: dict[str, BackendResult]) -> None:
    """Refuse a run that would compare nothing, or that misses a --require'd backend.

    Raises:
        ParityError: one line listing the backends asked for and why each did not run.
    """
    missing = [n for n in required if n in results]
    if missing:
        raise ParityError(f"--require (REQUIRE=) {','.join(required)}: did not run: "
                          f"{_not_run_line(not_run_groups([results[n] for n in missing]))}")
    if asked and all(n in results for n in asked):
        raise ParityError(f"nothing to compare with the reference: every backend asked for did not run "
                          f"({_not_run_line(not_run_groups([results[n] for n in asked]))}); make the files "
                          f"named, or pick backends that can run here (BACKENDS=)")


# ----------------------------------------------------------------------------------------------------
# The run: plan (what runs on which images), execute (every runner on the same batches), report
# ----------------------------------------------------------------------------------------------------
def _auto_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _auto_provider(provider: str) -> str:
    if provider == "auto":
        return "cuda" if OnnxRuntimeRunner.availability("cuda")[0] else "cpu"
    return provider


@dataclass
class ParityPlan:
    """Everything a parity run decides before any runner starts."""

    model_name: str
    out: Path
    device: str
    provider: str
    threads: int | None
    thresholds: Thresholds
    model: torch.nn.Module
    ckpt_sha: str
    data_cfg: DataConfig
    evalset: Any
    batcher: ImageBatcher
    reference: BackendSpec
    backends: list[BackendSpec]
    required: list[str]

    def artifact(self, spec: BackendSpec) -> str | None:
        """The file a backend runs, as the report names it (None for PyTorch)."""
        path = spec.artifact(self.out, self.model_name)
        return str(path) if path else None


@dataclass
class ParityRun:
    """What the runners produced: streaming statistics per backend, and the backends that did not run."""

    stats: dict[str, LogitStats]
    not_run: dict[str, BackendResult]
    describes: dict[str, dict[str, Any]]
    labels: np.ndarray
    paths: list[str]


def _thresholds(args: argparse.Namespace) -> Thresholds:
    thresholds = Thresholds()
    for prec, val in (args.max_delta_top1 or []):
        thresholds.max_delta_top1[prec] = val
    for prec, val in (args.min_agreement or []):
        thresholds.min_agreement[prec] = val
    return thresholds


def plan_parity(args: argparse.Namespace) -> ParityPlan:
    """Select the backends, build the reference model and the batcher; nothing runs yet."""
    device, provider = _auto_device(args.device), _auto_provider(args.provider)
    vocabulary = parity_backends(device, provider)
    asked = select_backends(args.backends, vocabulary)
    required = select_backends(args.require, vocabulary) if args.require else []
    required = [s for s in required if s != vocabulary[0]]  # the reference always runs
    out = Path(args.out) if args.out else default_out(args.model)
    if args.checkpoint is None:
        warnings.warn(
            f"NO --checkpoint: {args.model} gets RANDOM weights (seed {args.seed}); accuracies are meaningless "
            f"and ONNX files exported from other random weights will disagree. Pass CHECKPOINT=...",
            stacklevel=3)
    threads = apply_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint, img_size=args.img_size, weights=args.weights).eval()
    data_cfg = DataConfig.from_model(model)
    evalset = resolve_eval_set(args.data, class_names=model_class_names(model), num_classes=model.num_classes,
                               labels_file=args.labels)
    samples = evalset.samples
    if args.limit:
        samples = class_balanced_subset(samples, int(args.limit), seed=args.seed, what="--limit (LIMIT=)")
    return ParityPlan(
        model_name=args.model, out=out, device=device, provider=provider, threads=threads,
        thresholds=_thresholds(args), model=model, ckpt_sha=file_sha256(args.checkpoint) if args.checkpoint else "",
        data_cfg=data_cfg, evalset=evalset,
        batcher=ImageBatcher(samples, data_cfg, batch_size=args.batch_size, num_workers=args.workers),
        reference=vocabulary[0], backends=[s for s in vocabulary[1:] if s in asked or s in required],
        required=[s.name for s in required])


def resolve_runners(plan: ParityPlan, checkpoint: str | None) -> tuple[Runner, dict[BackendSpec, Runner],
                                                                        dict[str, BackendResult]]:
    """The reference runner, the runners of the backends that can run (their files checked against this
    model, precision and checkpoint), and the skipped or unstartable ones with why.

    Raises:
        ParityError: the reference cannot run, or a file is unreadable or not this run's.
    """
    def resolve(spec: BackendSpec) -> Runner | Skip:
        return resolve_backend(spec, plan.out, plan.model_name, model=plan.model, threads=plan.threads)

    reference = resolve(plan.reference)
    if isinstance(reference, Skip):
        raise ParityError(f"the reference {plan.reference.name} cannot run: {reference.reason} (--device)")
    runners: dict[BackendSpec, Runner] = {}
    not_run: dict[str, BackendResult] = {}
    for spec in plan.backends:
        artifact = plan.artifact(spec)
        try:
            runner = resolve(spec)
        except GraphError as e:  # 0 bytes, truncated, not ONNX: the message says which file and why
            raise ParityError(f"{spec.name}: {e} with {_fix_hint(spec, plan.model_name, checkpoint, plan.out)}") from e
        except (T2TError, OSError, RuntimeError, ValueError) as e:  # e.g. an unreadable engine sidecar
            not_run[spec.name] = BackendResult.not_run(spec, "error", f"could not start: {e}", artifact)
            continue
        if isinstance(runner, Skip):
            not_run[spec.name] = BackendResult.not_run(spec, "skipped", runner.reason, artifact)
        else:
            runners[spec] = runner
    check_artifacts(runners, plan.model, plan.model_name, plan.data_cfg, plan.ckpt_sha, checkpoint, plan.out)
    return reference, runners, not_run


def execute_parity(plan: ParityPlan, reference: Runner, runners: dict[BackendSpec, Runner],
                   not_run: dict[str, BackendResult], progress: bool = True) -> ParityRun:
    """Start every runner (one that cannot start is an error result) and run them all on the same batches."""
    asked = [s.name for s in plan.backends]
    stats: dict[str, LogitStats] = {plan.reference.name: LogitStats()}
    active: dict[str, Runner] = {}
    with ExitStack() as stack:
        stack.enter_context(reference)
        for spec, runner in runners.items():
            try:
                stack.enter_context(runner)
            except (T2TError, OSError, RuntimeError, ValueError) as e:
                not_run[spec.name] = BackendResult.not_run(spec, "error", f"could not start: {e}", plan.artifact(spec))
                continue
            active[spec.name] = runner
            stats[spec.name] = LogitStats()
        check_ran(asked, plan.required, not_run)  # again: a runner that could not start did not run either
        labels, paths = _run_batches(plan, reference, active, stats, progress)
        describes = {k: r.describe() for k, r in active.items()}
    return ParityRun(stats, not_run, describes, labels, paths)


def _run_batches(plan: ParityPlan, reference: Runner, runners: dict[str, Runner], stats: dict[str, LogitStats],
                 progress: bool) -> tuple[np.ndarray, list[str]]:
    """Every batch through the reference and each runner; the labels and image paths seen."""
    from tqdm import tqdm

    ref_name = plan.reference.name
    labels_all: list[np.ndarray] = []
    paths_all: list[str] = []
    n_batches = len(plan.batcher)
    bar = tqdm(plan.batcher, total=n_batches, desc=f"parity {plan.model_name}", unit="batch",
               disable=not progress or None)
    for i, (images, labels, paths) in enumerate(bar):
        y = labels.numpy()
        # First batch is warm-up (session/graph initialisation) unless it is the only one.
        timed = i > 0 or n_batches == 1
        t0 = time.perf_counter()
        ref_logits = reference.infer(images)
        dt = time.perf_counter() - t0
        stats[ref_name].update(ref_logits, y, None, dt if timed else None)
        for name, runner in runners.items():
            t0 = time.perf_counter()
            logits = runner.infer(images)
            dt = time.perf_counter() - t0
            if logits.shape != ref_logits.shape:
                raise ParityError(f"{runner.name} returned logits of shape {logits.shape}, the reference "
                                  f"{ref_logits.shape}; is {getattr(runner, 'path', '')} from this model?")
            stats[name].update(logits, y, ref_logits, dt if timed else None)
        labels_all.append(y)
        paths_all.extend(paths)
        bar.set_postfix(top1=f"{100.0 * stats[ref_name].correct1 / max(stats[ref_name].n, 1):.1f}")
    bar.close()
    if not labels_all:
        raise ParityError("no readable images in the selection")
    return np.concatenate(labels_all), paths_all


def _results(plan: ParityPlan, run: ParityRun) -> list[BackendResult]:
    """Reference first, then every asked-for backend in order: judged against its thresholds, or not run."""
    ref_stats = run.stats[plan.reference.name]
    reference = BackendResult(plan.reference.name, "pytorch", "fp32", "reference", metrics=ref_stats.summary())
    reference.metrics.update({"delta_top1": 0.0, "top1_agreement": 100.0})
    results = [reference]
    for spec in plan.backends:
        if spec.name in run.not_run:
            results.append(run.not_run[spec.name])
            continue
        m = run.stats[spec.name].summary(ref_stats)
        fails = plan.thresholds.check(spec.precision, m["delta_top1"], m["top1_agreement"])
        if m["nonfinite_images"]:
            fails.append(f"{m['nonfinite_images']} images with non-finite logits")
        res = BackendResult(spec.name, spec.family, spec.precision, "fail" if fails else "pass",
                            "; ".join(fails), plan.artifact(spec), m, spec.emulation)
        res.metrics["runner"] = run.describes[spec.name]
        results.append(res)
    return results


def _label_checks(plan: ParityPlan, ref_pred: np.ndarray, labels: np.ndarray) -> tuple[Any, list[str]]:
    """The 1-based-labels check of a flat labels file, and every label warning (logged)."""
    evalset = plan.evalset
    label_warnings = list(evalset.warnings)
    shift = shifted_label_check(ref_pred, labels) if evalset.layout == "flat+labels" else None
    if shift and shift["looks_one_based"]:
        label_warnings.append(
            f"the reference agrees with label - 1 on {shift['top1_label_minus_1']:.1f}% of the images but with the "
            f"label as given on only {shift['top1_as_given']:.1f}%: {evalset.labels_file} looks 1-based. Subtract 1 "
            f"from every label (0-based indices into the model's classes) and run again")
    for w in label_warnings:
        _logger.warning("LABELS: %s", w)
    return shift, label_warnings


def parity_report(plan: ParityPlan, run: ParityRun, args: argparse.Namespace,
                  argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The report (JSON-ready) of a finished run: verdict, per-backend metrics, data and settings."""
    results = _results(plan, run)
    ref_stats = run.stats[plan.reference.name]
    shift, label_warnings = _label_checks(plan, ref_stats.predictions, run.labels)
    failed = [r for r in results if r.status in ("fail", "error")]
    compared = [r.name for r in results if r.status in ("pass", "fail")]
    # A run that compared nothing is not a pass; check_ran refuses one unless only the reference was asked for.
    verdict = "FAIL" if failed else ("PASS" if compared else "REFERENCE ONLY")
    stem = plan.out / f"parity-{plan.model_name}"
    outputs = {"json": f"{stem}.json", "markdown": f"{stem}.md", "chart": f"{stem}.png",
               "disagreements": f"{stem}-disagreements.csv"}
    if args.save_predictions:
        outputs["predictions"] = f"{stem}-predictions.csv"
    evalset, model = plan.evalset, plan.model
    return {
        **report_header("evaluation.parity", argv),
        "model": plan.model_name,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "checkpoint_sha256": plan.ckpt_sha or None,
        "weights": model.pretrained_cfg.get("weights", "random"),
        "num_classes": int(model.num_classes),
        "data": {"root": str(evalset.root), "labels_file": evalset.labels_file, "layout": evalset.layout,
                 "class_mapping": evalset.mapping, "images_found": len(evalset.samples),
                 "limit": args.limit, "images_evaluated": int(ref_stats.n),
                 "images_unreadable": list(plan.batcher.skipped), "notes": evalset.notes,
                 "labels": evalset.label_summary(), "label_shift_check": shift, "label_warnings": label_warnings},
        "data_config": plan.data_cfg.as_dict(),
        "batch_size": args.batch_size,
        "device": plan.device,
        "ort_provider": plan.provider,
        "threads": plan.threads,
        "thresholds": plan.thresholds.as_dict(),
        "reference": plan.reference.name,
        "asked": [s.name for s in plan.backends],
        "required": plan.required,
        "compared": compared,
        "verdict": verdict,
        "passed": verdict == "PASS",
        "not_run": not_run_groups(results),
        "backends": [r.as_dict() for r in results],
        "outputs": outputs,
    }


def run_parity(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every selected backend on the same batches and write the report files; returns the report."""
    plan = plan_parity(args)
    reference, runners, not_run = resolve_runners(plan, args.checkpoint)
    check_ran([s.name for s in plan.backends], plan.required, not_run)
    run = execute_parity(plan, reference, runners, not_run, progress=not args.no_progress)
    report = parity_report(plan, run, args, argv)
    ref_name = plan.reference.name
    preds = {r["name"]: run.stats[r["name"]].predictions for r in report["backends"]
             if r["name"] in run.stats and r["name"] != ref_name}
    with OutputLock(plan.out):
        _write_outputs(report, report["outputs"], plan.out / f"parity-{plan.model_name}", run.paths, run.labels,
                       run.stats[ref_name].predictions, preds, plan.evalset.class_names)
    return report


def _write_outputs(report: dict[str, Any], outputs: dict[str, str], stem: Path, paths_all: list[str],
                   labels_np: np.ndarray, ref_pred: np.ndarray, preds: dict[str, np.ndarray],
                   class_names: list[str]) -> None:
    _write_disagreements(Path(outputs["disagreements"]), paths_all, labels_np, ref_pred, preds,
                         class_names, only_disagreements=True)
    if "predictions" in outputs:
        _write_disagreements(Path(outputs["predictions"]), paths_all, labels_np, ref_pred, preds,
                             class_names, only_disagreements=False)
    write_report(stem, report, render_markdown(report), _chart(report))


def _write_disagreements(path: Path, paths: list[str], labels: np.ndarray, ref_pred: np.ndarray,
                         preds: dict[str, np.ndarray], class_names: list[str], only_disagreements: bool) -> None:
    def cname(i: int) -> str:
        return readable_class(class_names[i]) if 0 <= i < len(class_names) else str(i)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "label_name", "reference", "reference_name",
                *preds, *[f"{k}_name" for k in preds]])
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


def _verdict(report: dict[str, Any]) -> str:
    return report.get("verdict") or ("PASS" if report["passed"] else "FAIL")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (a table per run, skipped backends with reasons)."""
    d = report["data"]
    lines = [
        f"# Parity: {report['model']}",
        "",
        f"- command: `{report['command']}`",
        f"- checkpoint: `{report['checkpoint'] or 'none (random weights)'}` ({report.get('weights')} weights)",
        f"- data: `{d['root']}` ({d['layout']}; {d['class_mapping']}), {d['images_evaluated']} images"
        + (f" (class-balanced subset of {d['images_found']}, LIMIT={d['limit']})" if d["limit"] else ""),
        f"- reference: {report['reference']}; batch size {report['batch_size']}; {report.get('threads')} threads",
        f"- host: {host_line(report['host'])}",
        f"- result: **{_verdict(report)}**",
        "",
        "| backend | precision | top-1 | top-5 | Δ top-1 | agreement | mean \\|Δlogit\\| | max \\|Δlogit\\| | KL "
        "| images/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in report["backends"]:
        if b["status"] in ("skipped", "error") and "top1" not in b:
            continue
        lines.append(
            f"| {b['name']} | {b['precision']}{' (emulated)' if b.get('emulated') else ''} | "
            f"{_fmt(b.get('top1'))} | {_fmt(b.get('top5'))} | "
            f"{_fmt(b.get('delta_top1'), '+.2f')} | {_fmt(b.get('top1_agreement'))}% | "
            f"{_fmt(b.get('mean_abs_dlogit'), '.2e')} | {_fmt(b.get('max_abs_dlogit'), '.2e')} | "
            f"{_fmt(b.get('mean_kl'), '.2e')} | {_fmt(b.get('images_per_s'), '.1f')} | "
            f"{b['status']}{': ' + b['reason'] if b['reason'] else ''} |")
    emulated = [b for b in report["backends"] if b.get("emulated") and "top1" in b]
    if emulated:
        lines += [""] + [f"- {b['name']}: {b['emulation']}." for b in emulated]
    if report.get("not_run"):
        lines += ["", "Asked for but not run:", ""]
        lines += [f"- {', '.join(g['backends'])} ({g['status']}): {g['reason']}" for g in report["not_run"]]
    lab = d.get("labels") or {}
    if d.get("label_warnings"):
        lines += ["", "**LABEL WARNING**: " + " / ".join(d["label_warnings"])]
    if lab:
        per = lab["per_class"]
        shown = ", ".join(f"{k}: {v}" for k, v in list(per.items())[:20]) + (" ..." if len(per) > 20 else "")
        lines += ["", f"Labels used: {lab['distinct']} classes, indices {lab['min']}..{lab['max']}"
                  f"{'' if lab['label_0_present'] else ' (no label 0)'}; images per class: {shown}"]
    if d.get("label_shift_check"):
        sc = d["label_shift_check"]
        lines += [f"Reference top-1 against the labels as given / label - 1 / label + 1: {sc['top1_as_given']:.1f}% / "
                  f"{sc['top1_label_minus_1']:.1f}% / {sc['top1_label_plus_1']:.1f}% (a 1-based labels file shows "
                  f"up as a high middle number)."]
    if d.get("images_unreadable"):
        bad = d["images_unreadable"]
        lines += ["", f"{len(bad)} unreadable images were skipped: " + ", ".join(f"`{b}`" for b in bad[:10])
                  + (" ..." if len(bad) > 10 else "")]
    th = report["thresholds"]
    lines += ["", "Thresholds: |Δ top-1| ≤ " + ", ".join(f"{k} {v:g}" for k, v in th["max_abs_delta_top1_points"].items())
              + " points; agreement ≥ " + ", ".join(f"{k} {v:g}%" for k, v in th["min_agreement_percent"].items())
              + ". images/s: inference calls during this run, first batch excluded (not a benchmark).", ""]
    return "\n".join(lines)


def _chart(report: dict[str, Any]) -> Any:
    """Bar chart of top-1 per backend, annotated with the delta and the agreement."""
    plt = pyplot()

    rows = [b for b in report["backends"] if b.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    colors = {"reference": "#4c72b0", "pass": "#55a868", "fail": "#c44e52"}
    y = np.arange(len(rows))
    ax.barh(y, [b["top1"] for b in rows], color=[colors.get(b["status"], "#8c8c8c") for b in rows])
    ax.set_yticks(y, [b["name"] + (" (emulated)" if b.get("emulated") else "") for b in rows])
    ax.invert_yaxis()
    hi = max(b["top1"] for b in rows) if rows else 100.0
    ax.set_xlim(0, min(100.0, hi * 1.25 + 1))
    for i, b in enumerate(rows):
        label = f"{b['top1']:.2f}" if b["status"] == "reference" else (
            f"{b['top1']:.2f} ({b['delta_top1']:+.2f}, agree {b['top1_agreement']:.1f}%)")
        ax.text(b["top1"], i, " " + label, va="center", fontsize=9)
    ax.set_xlabel("top-1 (%)  [Δ vs PyTorch fp32 in points]")
    ax.set_title(f"Parity {report['model']}: {report['data']['images_evaluated']} images, "
                 f"{_verdict(report)}", fontsize=10)
    fig.tight_layout()
    _fit_labels(fig, ax)
    return fig


def _fit_labels(fig: Any, ax: Any) -> None:
    """Widen the x axis until every bar label ends inside the axes (labels are text, not data)."""
    for _ in range(5):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        right = max((t.get_window_extent(renderer).x1 for t in ax.texts), default=0.0)
        limit = ax.get_window_extent(renderer).x1
        if right <= limit:
            return
        x0, x1 = ax.get_xlim()
        ax.set_xlim(x0, x1 * (1.0 + (right - limit) / max(limit - ax.get_window_extent(renderer).x0, 1.0)) + 1.0)


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
    add_stage_args(p, out_help="folder holding the ONNX files/engines and receiving the report "
                               "(default artifacts/<model>)")
    add_run_args(p, batch_size=32, workers=2)
    g = p.add_argument_group("parity")
    g.add_argument("--data", required=True, help="ImageNet-style val folder: synset folders, or flat with --labels")
    g.add_argument("--labels", default=None, help="ground truth for a flat folder: LOC_val_solution.csv or "
                                                  "'filename label' lines (0-based)")
    add_limit_arg(g)
    g.add_argument("--backends", default=None,
                   help="comma-separated runner names or prefixes (default: all), e.g. onnxruntime,tensorrt-fp16; "
                        "names: pytorch-<dev>-fp32, pytorch-<dev>-<bf16|fp16>-autocast, "
                        "onnxruntime-<cpu|cuda>-<fp32|fp16|int8|int8-cpu|fp8>, tensorrt-<fp32|fp16|int8|fp8>")
    g.add_argument("--require", default=None,
                   help="backends that must run, comma-separated names or prefixes like --backends (added to them), "
                        "e.g. tensorrt,onnxruntime-cpu-int8: one that cannot run stops the run with exit 2 (REQUIRE=)")
    g.add_argument("--device", default="auto", help="PyTorch device: auto, cpu, cuda")
    g.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="ONNX Runtime provider")
    g.add_argument("--max-delta-top1", type=_prec_value, action="append", metavar="PREC=POINTS",
                   help="override the |delta top-1| limit of a precision (repeatable), e.g. int8=0.5")
    g.add_argument("--min-agreement", type=_prec_value, action="append", metavar="PREC=PERCENT",
                   help="override the minimum top-1 agreement of a precision (repeatable), e.g. fp16=99.5")
    g.add_argument("--save-predictions", action="store_true",
                   help="also write every image's top-1 per backend to parity-<model>-predictions.csv")
    g.add_argument("--seed", type=int, default=0, help="subset seed (and random-weight seed without a checkpoint)")
    return p


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for b in report["backends"]:
        if "top1" in b:
            extra = "" if b["status"] == "reference" else (
                f"  delta {b['delta_top1']:+.2f}  agree {b['top1_agreement']:.2f}%  max|dlogit| {b['max_abs_dlogit']:.2e}")
            lines.append(f"  {b['name']:<32} top-1 {b['top1']:6.2f}{extra}  [{b['status']}"
                         f"{', emulated' if b.get('emulated') else ''}]"
                         + (f" {b['reason']}" if b["reason"] and b["status"] != "pass" else ""))
    for g in report.get("not_run") or []:  # once per reason, however many backends share it
        lines.append(f"  not run ({g['status']}): {', '.join(g['backends'])}: {g['reason']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        report = run_parity(args, argv)
        print(f"parity {report['model']} on {report['data']['images_evaluated']} images ({_verdict(report)}):")
        for w in report["data"]["label_warnings"]:
            print(f"  LABEL WARNING: {w}")
        print("\n".join(summary_lines(report)))
        print(f"report: {report['outputs']['markdown']} (+ .json, .png, disagreements .csv)")
        if report["verdict"] == "FAIL":
            raise ThresholdMissed("a backend missed its threshold (see the report)")
        return 0

    return run_command(body, "evaluation.parity")


if __name__ == "__main__":
    raise SystemExit(main())
