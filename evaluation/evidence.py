"""Every precision decision re-measured on one checkpoint at one size, in one resumable command.

``make precision-evidence MODEL=t2t_vit_7 CHECKPOINT=... DATA=<val> CALIB_DATA=<train> IMG_SIZE=224``
(``python -m evaluation.evidence``) runs the existing command-line tools, each as its own process with its
output in ``<out>/logs/<step>.log`` (the evidence never re-computes what a stage measures):

=================  ==============================================================================================
``onnx``           ``export.to_onnx``: fp32 and fp16 graphs; its validation compares the fp16 graph with and
                   without the Performer fp32 island (the export report's contrast row) on the val images
``precision``      ``evaluation.precision``: TF32 emulation, LayerNorm fp16 headroom, activation statistics
``calib-tensorrt`` ``calibration.calib --target tensorrt`` per method (entropy, percentile, max)
``calib-cpu``      ``calibration.calib --target cpu`` per method
``calib-fp8``      ``calibration.calib --precision fp8``, only when calib's parser offers it (else skipped)
``layers-<p>``     ``evaluation.layerwise`` for fp16, int8 and int8-cpu
``parity``         ``evaluation.parity`` on every backend (those that cannot run here are listed with the reason)
=================  ==============================================================================================

Stages write into ``<out>/model/`` as they always do; each step's report files are copied to
``<report-dir>/precision-evidence-<model>-<size>/`` and the summary, one table per decision with the numbers
the step reports hold and a verdict per the rules in :data:`RULES`, goes to
``<report-dir>/precision-evidence-<model>-<size>.{json,md}``.

Resumable: ``<out>/evidence-state.json`` records each finished step's key (its command and the checkpoint's
sha256); a step whose key matches and whose outputs exist and are newer than its inputs is skipped, so a
rerun after an interruption continues where it stopped. ``--only`` runs a subset (a step whose inputs are
missing is skipped with the reason). Ctrl-C or SIGTERM stops the running child and the run (exit 2).

Exit codes: 0 every step ran and every default holds; 1 a default is to revisit at this size or a stage
missed its threshold (everything written; ``--no-fail`` exits 0); 2 bad input, or a step failed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shlex
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from calibration import calib as calib_cli
from calibration.policy import DEFAULT_POLICY
from calibration.quantize import METHODS
from evaluation import precision as precision_cli
from evaluation.demo import run_logged_step
from evaluation.parity import DEFAULT_THRESHOLDS, Thresholds
from export.validate import FP16_MIN_TOP1_AGREEMENT
from t2t_vit.artifacts import onnx_path
from t2t_vit.checkpoint import build_model
from t2t_vit.cli import add_limit_arg, comma_list, run_command
from t2t_vit.data import scan_image_folder
from t2t_vit.errors import Interrupted, T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, atomic_write_bytes, atomic_write_json, file_sha256
from t2t_vit.reports import host_line, markdown_table, report_header, write_report

__all__ = ["STEPS", "RULES", "EvidenceError", "calib_precisions", "step_key", "plan_evidence", "summarize",
           "get_args_parser", "main"]

TOOL = "evaluation.evidence"
STEPS = ("onnx", "precision", "calib-tensorrt", "calib-cpu", "calib-fp8", "layers-fp16", "layers-int8",
         "layers-int8-cpu", "layers-fp8", "parity")
# The margins a verdict uses; the numbers come from the stages that own them (their defaults), except two.
MIN_HEADROOM = precision_cli.get_args_parser().get_default("min_headroom")  # the resolution sweep's 2x
MIN_AGREEMENT = precision_cli.get_args_parser().get_default("min_agreement")  # and its 99%
ISLAND_MIN_RATIO = 2.0  # the fp32 island is needed when dropping it moves logits at least this many times further
METHOD_MARGIN = 0.1  # points of top-1 agreement by which another calibration method must beat the default
DEFAULT_METHOD = calib_cli.get_args_parser().get_default("method")
RULES = {
    "tf32": "TF32 stays off while TF32 on every MatMul/Conv of the fp32 model would miss the tensorrt-fp32 parity "
            "threshold (|delta top-1| <= {d:g} points, agreement >= {a:g}%)",
    "layernorm": f"LayerNorm stays fp32 while an fp16 LayerNorm is unsafe: smallest headroom < {MIN_HEADROOM:g}x, or "
                 f"fp16-math top-1 agreement < {MIN_AGREEMENT:g}%, or a non-finite logit",
    "island": f"the Performer core stays fp32 while the fp16 graph without it misses the export's fp16 agreement "
              f"({FP16_MIN_TOP1_AGREEMENT:g}%), has a non-finite logit, or moves max |dlogit| at least "
              f"{ISLAND_MIN_RATIO:g}x as far as the graph with it",
    "int8": f"the int8 default ({DEFAULT_POLICY} placement, {DEFAULT_METHOD} calibration) holds while its "
            f"|delta top-1| <= {{d:g}} points (the int8 parity threshold) and no other method agrees with fp32 on "
            f"more than {METHOD_MARGIN:g} points more images",
}


class EvidenceError(T2TError, RuntimeError):
    """The evidence run cannot start as asked; the message says how to fix it."""


def calib_precisions() -> tuple[str, ...]:
    """The ``--precision`` choices of ``calibration.calib`` (empty when it has no such flag)."""
    for action in calib_cli.get_args_parser()._actions:
        if "--precision" in action.option_strings:
            return tuple(action.choices or ())
    return ()


# ----------------------------------------------------------------------------------------------------
# Plan: every step's command, inputs and outputs, settled (and bad input refused) before anything runs
# ----------------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    cmd: list[str]  # [module, *argv]
    inputs: list[Path]  # files the outputs must be newer than
    outputs: list[Path]  # files the step must have written (its report JSONs and graphs)
    reports: list[Path]  # report stems (under <out>/model) copied to the run's reports folder
    needs: tuple[str, ...] = ()
    unavailable: str = ""  # why this step cannot run here (the fp8 slot)
    key: str = ""


@dataclass
class Plan:
    model: str
    img_size: int
    checkpoint: Path
    checkpoint_sha256: str
    out: Path
    report_dir: Path
    steps: list[Step]
    selected: tuple[str, ...]
    in_process: bool = False
    verbose: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"precision-evidence-{self.model}-{self.img_size}"

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def run_reports(self) -> Path:
        return self.report_dir / self.name


def _check_inputs(args: argparse.Namespace, selected: Sequence[str]) -> tuple[Path, Path, Path | None]:
    if not args.checkpoint:
        raise EvidenceError("CHECKPOINT= (--checkpoint) is required: the evidence is of trained weights, e.g. "
                            "CHECKPOINT=runs/imagenette-t2t_vit_7-224/best.pth")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise EvidenceError(f"CHECKPOINT= (--checkpoint) {ckpt} does not exist; pass the .pth to measure (the 224 px "
                            f"reference: make train-imagenette-224)")
    if not args.data or not Path(args.data).is_dir():
        raise EvidenceError(f"DATA= (--data) {args.data or '(not set)'} is not a folder; pass the val split, e.g. "
                            f"DATA=../shared/data/imagenette2/val")
    calib_data = Path(args.calib_data) if args.calib_data else None
    if any(s.startswith("calib") for s in selected) and (calib_data is None or not calib_data.is_dir()):
        raise EvidenceError(f"CALIB_DATA= (--calib-data) {calib_data or '(not set)'} is not a folder; pass the "
                            f"train split, e.g. CALIB_DATA=../shared/data/imagenette2/train (or --only without "
                            f"the calib steps)")
    return ckpt, Path(args.data), calib_data


def _steps(args: argparse.Namespace, model: str, img: int, ckpt: Path, data: Path, calib_data: Path | None,
           md: Path) -> list[Step]:
    """The commands, as a user would type them (the make targets' flags)."""
    common = ["--model", model, "--checkpoint", str(ckpt), "--img-size", str(img)]
    run = ["--out", str(md)] + (["--threads", str(args.threads)] if args.threads else [])
    quiet = [] if args.verbose else ["--no-progress"]
    limit = ["--limit", str(args.limit)] if args.limit else []
    val_images = args.limit or len(scan_image_folder(data)[0])
    g = {p: onnx_path(md, model, p) for p in ("fp32", "fp16", "int8", "int8-cpu", "fp8")}
    methods = [DEFAULT_METHOD] + [m for m in METHODS if m != DEFAULT_METHOD]
    calib = ["calibration.calib", *common, *run, *quiet, "--calib-data", str(calib_data), "--calib-size",
             str(args.calib_size), "--val-data", str(data), "--percentile", f"{args.percentile:g}"] + (
                 ["--val-size", str(args.limit)] if args.limit else [])
    fp8 = "fp8" in calib_precisions()
    steps = [
        Step("onnx", ["export.to_onnx", *common, *run, "--data", str(data), "--val-images", str(val_images),
                      "--no-fail"], [ckpt], [g["fp32"], g["fp16"], md / f"{model}.export.json"],
             [md / f"{model}.export"]),
        Step("precision", ["evaluation.precision", *common, *run, *quiet, "--data", str(data), *limit], [ckpt],
             [md / f"{n}-{model}.json" for n in ("precision-tf32", "precision-layernorm", "activations")],
             [md / f"{n}-{model}" for n in ("precision-tf32", "precision-layernorm", "activations")]),
        Step("calib-tensorrt", [*calib, "--method", ",".join(methods), "--target", "tensorrt"], [g["fp32"], g["fp16"]],
             [g["int8"], md / f"{model}.calib.json"], [md / f"{model}.calib"], needs=("onnx",)),
        Step("calib-cpu", [*calib, "--method", ",".join(methods), "--target", "cpu"], [g["fp32"]],
             [g["int8-cpu"], md / f"{model}.calib-cpu.json"],
             [md / f"{model}.calib-cpu"], needs=("onnx",)),
        # The same methods as int8 (the fp8 graph is their ranges with float8e4m3fn quantizers).
        Step("calib-fp8", [*calib, "--method", ",".join(methods), "--precision", "fp8", "--report",
                           str(md / f"calib-fp8-{model}")],
             [g["fp32"], g["fp16"]], [g["fp8"], md / f"calib-fp8-{model}.json"], [md / f"calib-fp8-{model}"],
             needs=("onnx",),
             unavailable="" if fp8 else "make calib PRECISION=fp8 not available (calibration.calib has no "
                                        "--precision fp8)"),
    ]
    layer_steps = [("fp16", "onnx"), ("int8", "calib-tensorrt"), ("int8-cpu", "calib-cpu")] + ([("fp8", "calib-fp8")]
                                                                                               if fp8 else [])
    for prec, needs in layer_steps:
        steps.append(Step(f"layers-{prec}", ["evaluation.layerwise", *common, *run, "--precision", prec, "--data",
                                             str(data), "--images", str(args.layer_images)],
                          [g["fp32"], g[prec]], [md / f"layers-{model}-{prec}.json"], [md / f"layers-{model}-{prec}"],
                          needs=(needs,)))
    steps.append(Step("parity", ["evaluation.parity", *common, *run, *quiet, "--data", str(data), *limit],
                      list(g.values()), [md / f"parity-{model}.json"], [md / f"parity-{model}"], needs=("onnx",)))
    return steps


def step_key(cmd: Sequence[str], checkpoint_sha256: str) -> str:
    """What makes a step's result: its command without the flags that change only how it runs (threads,
    progress bars), and the checkpoint's content."""
    argv, kept, skip = list(cmd), [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--threads":
            skip = True
        elif a != "--no-progress":
            kept.append(a)
    return hashlib.sha256(json.dumps([kept, checkpoint_sha256]).encode()).hexdigest()[:16]


def plan_evidence(args: argparse.Namespace) -> Plan:
    """Check the input and settle every step (the checkpoint is loaded once, for its size and validity).

    Raises:
        EvidenceError, T2TError: a missing checkpoint or data folder, an unknown step, an unreadable checkpoint.
    """
    selected = tuple(args.only) if args.only else STEPS
    unknown = [s for s in selected if s not in STEPS]
    if unknown:
        raise EvidenceError(f"--only (ONLY=): unknown steps {unknown}; choose from {', '.join(STEPS)}")
    ckpt, data, calib_data = _check_inputs(args, selected)
    model = build_model(args.model, checkpoint=ckpt, img_size=args.img_size)  # refuses a bad file or size
    img = int(model.img_size)
    out = Path(args.out) if args.out else Path("artifacts") / f"precision-evidence-{args.model}-{img}"
    sha = file_sha256(ckpt)
    steps = _steps(args, args.model, img, ckpt, data, calib_data, out / "model")
    for s in steps:
        s.key = step_key(s.cmd, sha)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return Plan(args.model, img, ckpt, sha, out, Path(args.report_dir), steps, selected, args.in_process,
                args.verbose, env)


# ----------------------------------------------------------------------------------------------------
# Execute: each selected step, unless it is up to date
# ----------------------------------------------------------------------------------------------------
def _state_path(plan: Plan) -> Path:
    return plan.out / "evidence-state.json"


def _load_state(plan: Plan) -> dict[str, Any]:
    try:
        return json.loads(_state_path(plan).read_text())
    except (OSError, ValueError):
        return {}


def up_to_date(step: Step, state: dict[str, Any]) -> bool:
    """Finished before with this key, every output present, none older than an input."""
    rec = state.get(step.name) or {}
    if rec.get("key") != step.key or rec.get("status") not in ("ok", "threshold"):
        return False
    if not all(p.is_file() for p in step.outputs):
        return False
    newest_input = max((p.stat().st_mtime for p in step.inputs if p.is_file()), default=0.0)
    return min(p.stat().st_mtime for p in step.outputs) >= newest_input


class _StderrNow(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record comes (the step's log, in process)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _run_in_process(step: Step, log: Path) -> int:
    """The stage's ``main(argv)`` in this process (``--in-process``: no interpreter start per step). The root
    logger gets one handler first, so a stage's ``logging.basicConfig`` cannot bind a closed log file."""
    module = importlib.import_module(step.cmd[0])
    root = logging.getLogger()
    handler, level = _StderrNow(), root.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with open(log, "w") as f, redirect_stdout(f), redirect_stderr(f):
            f.write("$ python -m " + shlex.join(step.cmd) + "\n")
            rc = module.main(step.cmd[1:])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
    if tail and ": interrupted (" in tail[0]:  # the stage caught the interrupt and returned 2: stop the run too
        raise Interrupted(tail[0].split("interrupted (", 1)[1].split(")")[0])
    return int(rc or 0)


def _run_step(plan: Plan, step: Step, i: int) -> dict[str, Any]:
    tag = f"[evidence {i}/{len(plan.steps)}] {step.name}"
    print(f"{tag}: python -m {shlex.join(step.cmd)}", flush=True)
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if plan.in_process:
        rc, log = _run_in_process(step, logs / f"{step.name}.log"), logs / f"{step.name}.log"
    else:
        rc, _, log = run_logged_step(step.name, [sys.executable, "-m", *step.cmd], logs, plan.verbose, plan.env,
                                     cwd=Path.cwd(), tag="evidence")
    secs = round(time.perf_counter() - t0, 1)
    written = all(p.is_file() for p in step.outputs)
    status = "ok" if rc == 0 and written else ("threshold" if rc == 1 and written else "failed")
    what = {"ok": "ok", "threshold": "done, a stage threshold was missed (see its report)",
            "failed": f"FAILED (exit {rc}; log {log})"}[status]
    print(f"{tag}: {what} in {secs:.0f} s", flush=True)
    return {"status": status, "rc": rc, "seconds": secs, "key": step.key, "log": str(log),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def execute(plan: Plan) -> dict[str, dict[str, Any]]:
    """Run the selected steps in order; returns every step's result (run now, earlier, skipped)."""
    state = _load_state(plan)
    results: dict[str, dict[str, Any]] = {}
    for i, step in enumerate(plan.steps, 1):
        fresh = up_to_date(step, state)
        missing = [n for n in step.needs if results.get(n, {}).get("status") not in ("ok", "threshold")]
        if step.unavailable:
            res = {"status": "skipped", "reason": step.unavailable}
        elif step.name not in plan.selected:
            res = ({**state[step.name], "status": state[step.name]["status"], "reason": "earlier run (not in --only)"}
                   if fresh else {"status": "not run", "reason": "not in --only and no up-to-date earlier run"})
        elif fresh:
            res = {**state[step.name], "reason": "up to date (same command and checkpoint, outputs newer than inputs)"}
        elif missing:
            res = {"status": "skipped", "reason": f"needs {', '.join(missing)}, which did not finish"}
        else:
            res = _run_step(plan, step, i)
            if res["status"] != "failed":
                state[step.name] = res
            else:
                state.pop(step.name, None)
            atomic_write_json(_state_path(plan), state)
        if res["status"] in ("skipped", "not run") or res.get("reason", "").startswith(("up to date", "earlier")):
            print(f"[evidence {i}/{len(plan.steps)}] {step.name}: {res['status']}: {res['reason']}", flush=True)
        results[step.name] = res
    return results


def copy_reports(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each finished step's report files (json, md, png, csv) -> ``<report-dir>/<name>/``; returns them per step."""
    copied: dict[str, list[str]] = {}
    for step in plan.steps:
        if results[step.name]["status"] not in ("ok", "threshold"):
            continue
        files = []
        for stem in step.reports:
            for suffix in (".json", ".md", ".png", "-disagreements.csv"):
                src = stem.with_name(stem.name + suffix)
                if src.is_file():
                    atomic_write_bytes(plan.run_reports / src.name, src.read_bytes())
                    files.append(src.name)
        copied[step.name] = files
    return copied


# ----------------------------------------------------------------------------------------------------
# Report: one table per decision, the numbers read from the step reports
# ----------------------------------------------------------------------------------------------------
def _read(plan: Plan, results: dict[str, Any], step: str, name: str) -> dict[str, Any] | None:
    if results.get(step, {}).get("status") not in ("ok", "threshold"):
        return None
    path = plan.model_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def _row(what: str, source: str, agreement: Any = None, dlogit: Any = None, delta: Any = None,
         headroom: Any = None, **extra: Any) -> dict[str, Any]:
    return {"measurement": what, "top1_agreement": agreement, "max_abs_dlogit": dlogit, "delta_top1": delta,
            "headroom": headroom, "source": source, **extra}


def _decision(name: str, default: str, rule: str, rows: list[dict[str, Any]], verdict: str, why: str) -> dict[str, Any]:
    return {"decision": name, "default": default, "rule": rule, "rows": rows, "verdict": verdict, "why": why}


def _not_measured(name: str, default: str, rule: str, step: str) -> dict[str, Any]:
    return _decision(name, default, rule, [], "not measured", f"the {step} step did not finish")


def _tf32(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    d, a = DEFAULT_THRESHOLDS["fp32"]
    rule = RULES["tf32"].format(d=d, a=a)
    src = f"precision-tf32-{plan.model}.json"
    rep = _read(plan, results, "precision", src)
    if rep is None:
        return _not_measured("TF32 off", "cleared (--tf32 allows it)", rule, "precision")
    rows = [_row(r["variant"], src, r["top1_agreement"], r["max_abs_dlogit"], r["delta_top1"]) for r in rep["rows"][1:]]
    every = next(r for r in rep["rows"] if "every MatMul" in r["variant"])
    misses = Thresholds().check("fp32", every["delta_top1"], every["top1_agreement"])
    why = (f"TF32 on every MatMul/Conv would miss the fp32 threshold ({'; '.join(misses)})" if misses else
           "TF32 on every MatMul/Conv keeps the fp32 parity threshold here: --tf32 is a safe opt-in at this size")
    return _decision("TF32 off", "cleared (--tf32 allows it)", rule, rows, "holds" if misses else "revisit", why)


def _layernorm(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    src = f"precision-layernorm-{plan.model}.json"
    default = "fp32 behind Casts (--layernorm-precision fp16 opts out)"
    rep = _read(plan, results, "precision", src)
    if rep is None:
        return _not_measured("LayerNorm in fp32", default, RULES["layernorm"], "precision")
    worst = min(rep["layernorms"], key=lambda s: s["fp16_headroom"])
    rows = [_row(f"smallest fp16 headroom (`{worst['module']}`)", src, headroom=rep["min_fp16_headroom"])]
    rows += [_row(r["variant"], src, r["top1_agreement"], r["max_abs_dlogit"], r["delta_top1"],
                  nonfinite_images=r["nonfinite_images"]) for r in rep["rows"]]
    math16 = next(r for r in rep["rows"] if r["variant"].endswith("fp16-math"))
    unsafe = [w for w, bad in ((f"headroom {rep['min_fp16_headroom']:.3g}x < {MIN_HEADROOM:g}x",
                                rep["min_fp16_headroom"] < MIN_HEADROOM),
                               (f"fp16-math agreement {math16['top1_agreement']:.2f}% < {MIN_AGREEMENT:g}%",
                                math16["top1_agreement"] < MIN_AGREEMENT),
                               (f"{math16['nonfinite_images']} images with non-finite logits",
                                math16["nonfinite_images"] > 0)) if bad]
    why = ("an fp16 LayerNorm is unsafe: " + "; ".join(unsafe)) if unsafe else \
        "an fp16 LayerNorm passes every margin at this size: fp32 costs bandwidth for nothing measured here"
    return _decision("LayerNorm in fp32", default, RULES["layernorm"], rows, "holds" if unsafe else "revisit", why)


def _island(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    src = f"{plan.model}.export.json"
    default = "fp32 island (export.patterns.performer_core_fp32)"
    rep = _read(plan, results, "onnx", src)
    v = (rep or {}).get("validation")
    if not v:
        return _not_measured("Performer core in fp32", default, RULES["island"], "onnx")
    by = {c["name"]: c for c in v["comparisons"]}
    top1 = v.get("labels_top1") or {}
    delta = top1["ORT fp16"] - top1["ORT fp32"] if "ORT fp16" in top1 else None
    with_ = by["ORT fp16 vs ORT fp32"]
    rows = [_row("fp16 graph with the fp32 island vs fp32 graph", src, with_["top1_agreement"],
                 with_["max_abs_dlogit"], delta)]
    without = next((c for n, c in by.items() if "without the fp32 island" in n), None)
    if without is None:
        return _decision("Performer core in fp32", default, RULES["island"], rows, "not measured",
                         "the export report has no contrast without the island (the graph has no fp32 island)")
    rows.append(_row("fp16 graph without it vs fp32 graph", src, without["top1_agreement"], without["max_abs_dlogit"]))
    ratio = without["max_abs_dlogit"] / with_["max_abs_dlogit"] if with_["max_abs_dlogit"] > 0 else float("inf")
    needed = [w for w, bad in ((f"agreement {without['top1_agreement']:.2f}% < {FP16_MIN_TOP1_AGREEMENT:g}%",
                                without["top1_agreement"] < FP16_MIN_TOP1_AGREEMENT),
                               (f"{without['nonfinite_images']} non-finite images", without["nonfinite_images"] > 0),
                               (f"max |dlogit| {ratio:.3g}x the island's", ratio >= ISLAND_MIN_RATIO)) if bad]
    why = ("without the island: " + "; ".join(needed)) if needed else \
        f"without the island the fp16 graph stays within every margin (max |dlogit| {ratio:.3g}x)"
    return _decision("Performer core in fp32", default, RULES["island"], rows, "holds" if needed else "revisit", why)


def _int8(plan: Plan, results: dict[str, Any], target: str) -> dict[str, Any]:
    step, name = (("calib-tensorrt", f"{plan.model}.calib.json") if target == "tensorrt" else
                  ("calib-cpu", f"{plan.model}.calib-cpu.json"))
    title = f"int8 for {'TensorRT (fp16 graph + Q/DQ)' if target == 'tensorrt' else 'ONNX Runtime CPU'}"
    default = f"{DEFAULT_POLICY} placement, {DEFAULT_METHOD} calibration"
    limit = DEFAULT_THRESHOLDS["int8" if target == "tensorrt" else "int8-cpu"][0]
    rule = RULES["int8"].format(d=limit)
    rep = _read(plan, results, step, name)
    if rep is None or "accuracy" not in rep:
        return _not_measured(title, default, rule, step)
    acc = {k[len("int8-"):]: a for k, a in rep["accuracy"].items() if k.startswith("int8-")}
    rows = [_row(f"{m} calibration", name, a["top1_agreement"], a["max_abs_dlogit"], 0.0 - a["top1_drop"])
            for m, a in acc.items()]
    own = acc[DEFAULT_METHOD]
    best = max(acc, key=lambda m: acc[m]["top1_agreement"])
    problems = []
    if abs(own["top1_drop"]) > limit + 1e-9:
        problems.append(f"{DEFAULT_METHOD} moves top-1 by {-own['top1_drop']:+.2f} points (limit {limit:g})")
    if acc[best]["top1_agreement"] - own["top1_agreement"] > METHOD_MARGIN + 1e-9:
        problems.append(f"{best} agrees on {acc[best]['top1_agreement']:.2f}% vs {own['top1_agreement']:.2f}%")
    why = "; ".join(problems) or f"{DEFAULT_METHOD} is within the threshold and no method beats it by the margin"
    return _decision(title, default, rule, rows, "revisit" if problems else "holds", why)


def _fp8(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    res, name = results["calib-fp8"], f"calib-fp8-{plan.model}.json"
    rep = _read(plan, results, "calib-fp8", name)
    if rep is None or "accuracy" not in rep:
        return _decision("fp8 (TensorRT)", "not a default", "measured only", [], res["status"],
                         res.get("reason") or "the calib-fp8 step did not finish")
    rows = [_row(k, name, a.get("top1_agreement"), a.get("max_abs_dlogit"),
                 0.0 - a["top1_drop"] if "top1_drop" in a else None)
            for k, a in rep["accuracy"].items() if k not in ("fp32", "fp16")]
    return _decision("fp8 (TensorRT)", "not a default", "measured only", rows, "measured", "no default to hold")


def _checks(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    """The layer-wise comparisons and parity: not decisions, the evidence a failing decision points to."""
    layers = []
    for prec in ("fp16", "int8", "int8-cpu"):
        name = f"layers-{plan.model}-{prec}.json"
        rep = _read(plan, results, f"layers-{prec}", name)
        if rep is None:
            layers.append({"precision": prec, "status": results[f"layers-{prec}"]["status"], "source": name})
            continue
        for runner, fb in rep["result"]["first_bad"].items():
            layers.append({"precision": prec, "runner": runner, "tolerance": rep["tolerance"], "source": name,
                           "first_past_tolerance": None if fb is None else fb["module"],
                           "relative_error": None if fb is None else fb["relative"]})
    name = f"parity-{plan.model}.json"
    rep = _read(plan, results, "parity", name)
    parity = None if rep is None else {
        "verdict": rep["verdict"], "images": rep["data"]["images_evaluated"], "source": name,
        "backends": [{k: b.get(k) for k in ("name", "precision", "status", "reason", "top1", "delta_top1",
                                            "top1_agreement", "max_abs_dlogit")}
                     for b in rep["backends"] if "top1" in b],
        "not_run": rep.get("not_run") or []}
    return {"layers": layers, "parity": parity}


def summarize(plan: Plan, results: dict[str, dict[str, Any]], copied: dict[str, list[str]],
              argv: Sequence[str] | None) -> dict[str, Any]:
    """The summary report (JSON-ready): decisions with verdicts, checks, steps and their report files."""
    decisions = [_tf32(plan, results), _layernorm(plan, results), _island(plan, results),
                 _int8(plan, results, "tensorrt"), _int8(plan, results, "cpu"), _fp8(plan, results)]
    return {**report_header(TOOL, argv), "model": plan.model, "img_size": plan.img_size,
            "checkpoint": str(plan.checkpoint), "checkpoint_sha256": plan.checkpoint_sha256, "out": str(plan.out),
            "reports_folder": str(plan.run_reports), "rules": RULES,
            "steps": [{"step": s.name, "command": "python -m " + shlex.join(s.cmd), **results[s.name],
                       "reports": [f"{plan.name}/{f}" for f in copied.get(s.name, [])]} for s in plan.steps],
            "decisions": decisions, "checks": _checks(plan, results),
            "all_defaults_hold": all(d["verdict"] in ("holds", "measured", "skipped") for d in decisions)}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Precision evidence: {s['model']} at {s['img_size']} px", "", f"`{s['command']}`", "",
             f"Checkpoint `{s['checkpoint']}` (sha256 `{s['checkpoint_sha256']}`). Host: {host_line(s['host'])}.",
             "Every number below is read from the step report named in its row (copies in "
             f"[`{Path(s['reports_folder']).name}/`]({Path(s['reports_folder']).name}/)).", ""]
    for d in s["decisions"]:
        lines += [f"## {d['decision']}: **{d['verdict']}**", "", f"Default: {d['default']}. Rule: {d['rule']}. "
                  f"Verdict: {d['why']}.", ""]
        if d["rows"]:
            lines += [markdown_table(["measurement", "top-1 agreement %", "max abs dlogit", "delta top-1", "headroom",
                                      "source"],
                                     [[r["measurement"], _fmt(r["top1_agreement"], ".2f"),
                                       _fmt(r["max_abs_dlogit"], ".3g"), _fmt(r["delta_top1"], "+.2f"),
                                       _fmt(r["headroom"], ".3g") + ("x" if r["headroom"] else ""), r["source"]]
                                      for r in d["rows"]]), ""]
    ch = s["checks"]
    lines += ["## Layer-wise (first tensor past the tolerance)", "",
              markdown_table(["precision", "runner", "tolerance", "first past tolerance", "relative error"],
                             [[r["precision"], r.get("runner", r.get("status")), r.get("tolerance"),
                               r.get("first_past_tolerance") or ("within tolerance" if "runner" in r else "-"),
                               _fmt(r.get("relative_error"), ".3g")] for r in ch["layers"]]), ""]
    if ch["parity"]:
        p = ch["parity"]
        lines += [f"## Parity: **{p['verdict']}** on {p['images']} images", "",
                  markdown_table(["backend", "status", "top-1", "delta top-1", "agreement %", "max abs dlogit"],
                                 [[b["name"], b["status"] + (f": {b['reason']}" if b["reason"] else ""),
                                   _fmt(b["top1"], ".2f"), _fmt(b["delta_top1"], "+.2f"),
                                   _fmt(b["top1_agreement"], ".2f"), _fmt(b["max_abs_dlogit"], ".3g")]
                                  for b in p["backends"]]), ""]
        lines += [f"Not run ({g['status']}): {', '.join(g['backends'])}: {g['reason']}" for g in p["not_run"]]
        lines += [""] if p["not_run"] else []
    lines += ["## Steps", "", markdown_table(
        ["step", "status", "seconds", "reports"],
        [[st["step"], st["status"] + (f" ({st['reason']})" if st.get("reason") else ""), st.get("seconds"),
          ", ".join(f"[{Path(f).name}]({f})" for f in st["reports"] if f.endswith(".md")) or "-"]
         for st in s["steps"]]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Re-measure every precision decision on one checkpoint at one size "
                                            "(export, precision, calib per target and method, layers, parity)",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="registered model name, e.g. t2t_vit_7")
    p.add_argument("--checkpoint", default=None, help="the weights to measure (required; CHECKPOINT=)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's; IMG_SIZE=)")
    p.add_argument("--data", default=None, help="labelled val folder (DATA=)")
    p.add_argument("--calib-data", default=None, help="calibration images, an ImageFolder tree (CALIB_DATA=)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024; CALIB_SIZE=)")
    p.add_argument("--percentile", type=float, default=99.99,
                   help="the percentile method's percentile (default 99.99; calib refuses a calibration set with "
                        "fewer values than it needs)")
    add_limit_arg(p)
    p.add_argument("--layer-images", type=int, default=16, help="images for the layer-wise comparison (default 16)")
    p.add_argument("--out", default=None,
                   help="run folder: graphs, stage reports, logs, state "
                        "(default artifacts/precision-evidence-<model>-<size>)")
    p.add_argument("--report-dir", default="reports",
                   help="folder of the summary precision-evidence-<model>-<size>.{json,md} and of the step reports' "
                        "copies (default reports)")
    p.add_argument("--only", type=comma_list(), default=None, help=f"steps to run, comma-separated: {', '.join(STEPS)}")
    p.add_argument("--threads", default=None, help="--threads passed to every stage (default: theirs, auto)")
    p.add_argument("--in-process", action="store_true",
                   help="call each stage's main() in this process instead of a child (faster start; for tests)")
    p.add_argument("--verbose", action="store_true", help="stream every step's output (it always goes to logs/)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when a default is to revisit")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    plan = plan_evidence(args)
    with OutputLock(plan.out):
        results = execute(plan)
        copied = copy_reports(plan, results)
        summary = summarize(plan, results, copied, argv)
        stem = plan.report_dir / plan.name
        write_report(stem, summary, render_markdown(summary))
    summary["written"] = str(stem) + ".md"
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        s = run(args, argv)
        for d in s["decisions"]:
            print(f"  {d['decision']}: {d['verdict']} ({d['why']})")
        print(f"summary: {s['written']} (+ .json); step reports in {s['reports_folder']}/")
        failed = [st["step"] for st in s["steps"] if st["status"] == "failed"]
        if failed:
            raise EvidenceError(f"steps {', '.join(failed)} failed; their logs are under {s['out']}/logs/ "
                                f"(run the same command again to retry them: finished steps are skipped)")
        revisit = [d["decision"] for d in s["decisions"] if d["verdict"] == "revisit"]
        parity = s["checks"]["parity"]
        if (revisit or (parity and parity["verdict"] == "FAIL")) and not args.no_fail:
            raise ThresholdMissed(f"at {s['img_size']} px: " + "; ".join(
                [f"{d} to revisit" for d in revisit] + (["parity FAIL"] if parity and parity["verdict"] == "FAIL"
                                                        else [])) + f" (see {s['written']})")
        return 0

    return run_command(body, TOOL)


if __name__ == "__main__":
    raise SystemExit(main())
