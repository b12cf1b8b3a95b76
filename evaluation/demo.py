"""The whole pipeline on a small real dataset, on a CPU, in minutes (``make demo``).

::

    make install && make demo                      # everything under artifacts/demo/
    python -m evaluation.demo --out /tmp/demo --epochs 1 --train-images 200   # a shorter run

Steps, each through the same command-line tool a user runs (so the demo cannot drift from them), with
each tool's output kept in ``<out>/logs/<step>.log``:

1. data: Imagenette (``../shared/data/imagenette2`` beside the checkout, when present) or scikit-learn's
   bundled ``digits`` (1,797 real 8x8 scans, no download), written as an ImageFolder tree of upscaled
   PNGs under ``<out>/data/digits``;
2. train (``python -m train.train``) a small T2T-ViT for a few epochs -> ``<out>/train/best.pth``;
3. onnx (``python -m export.to_onnx``) -> ``<out>/model/<model>.fp32.onnx`` / ``.fp16.onnx``;
4. calib (``python -m calibration.calib``) -> ``<out>/model/<model>.int8.onnx``, with ``--target cpu``
   ``<model>.int8-cpu.onnx``, and with ``--precision fp8`` ``<model>.fp8.onnx`` (the same ranges: the range
   cache of the first run);
5. engine (``python -m engines.build``) fp32/fp16/int8 engines when TensorRT and a GPU are present, and the
   fp8 engine on a GPU of the compute capability the fp8 graph records (SM 8.9+); otherwise reported as
   skipped with the reason;
6. bench (``python -m engines.bench --tensorrt auto``) -> ``<out>/model/bench-engines-*``;
7. parity (``python -m evaluation.parity``) -> ``<out>/model/parity-<model>.*`` (fp8 on ONNX Runtime: an
   emulation, marked so);

then prints a one-screen summary and writes it to ``<out>/demo-summary.md`` (+ ``demo.json``).
A failing step is reported with its log and the demo goes on where later steps do not depend on it.
Stopping the demo (Ctrl-C, SIGTERM) stops the step that is running, and says so.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engines.backends import capability_shortfall, required_compute_capability
from engines.trt_compat import gpu_info
from engines.trt_runtime import TensorRTRunner
from t2t_vit.cli import run_command
from t2t_vit.data import IMG_EXTENSIONS, imagenette_root
from t2t_vit.env import host_info
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, atomic_write_json, atomic_write_text
from t2t_vit.graphs import read_metadata
from t2t_vit.timing import child_process_kwargs

__all__ = ["DemoError", "run_logged_step", "write_digits_dataset", "get_args_parser", "main", "run_demo"]

REPO = Path(__file__).resolve().parents[1]
STEPS = ("data", "train", "onnx", "calib", "engine", "bench", "parity")


class DemoError(T2TError, RuntimeError):
    """The demo cannot start (bad folder or options); the message says how to fix it."""


@dataclass
class StepResult:
    step: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    command: str = ""
    log: str | None = None
    reason: str = ""
    outputs: list[str] = field(default_factory=list)


def write_digits_dataset(root: str | Path, size: int = 72, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<n>.png`` RGB images of ``size`` px.

    The 8x8 scans (16 grey levels) are upscaled bicubically so the model's eval transform (resize to
    ``img_size / 0.9``, centre crop) sees a whole digit. The split is stratified and seeded, and the
    tree is rewritten only when incomplete, so repeated demos reuse it.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == f"{size} {val_fraction} {seed}":
        return root
    digits = load_digits()
    idx = np.arange(len(digits.target))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    for split, ids in (("train", tr), ("val", va)):
        for i in ids:
            label = int(digits.target[i])
            d = root / split / str(label)
            d.mkdir(parents=True, exist_ok=True)
            # 0..16 ink -> white background, dark strokes, like a scan.
            pixels = (255 - digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB").save(d / f"{i:04d}.png")
    marker.write_text(f"{size} {val_fraction} {seed}")
    return root


def run_logged_step(step: str, cmd: list[str], logs: Path, verbose: bool, env: dict[str, str],
                    cwd: Path = REPO, tag: str = "demo") -> tuple[int, float, Path]:
    """Run one step's command with its output in ``logs/<step>.log`` (and on the terminal with ``verbose``);
    the child stops when this process is interrupted or fails. Returns (exit code, seconds, log)."""
    log = logs / f"{step}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if verbose else f, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, text=True, bufsize=1, **child_process_kwargs())
        try:
            if verbose:
                assert proc.stdout is not None
                for line in proc.stdout:
                    sys.stdout.write(line)
                    f.write(line)
            rc = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM (t2t_vit.errors.Interrupted): stop the step, then the demo
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print(f"[{tag}] stopped the running step `{step}` (pid {proc.pid}); its log: {log}", flush=True)
            raise
    return rc, time.perf_counter() - t0, log


def _tail(log: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join("      " + ln[:150] for ln in lines[-n:])


def _count_images(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected steps; returns the summary (also written to ``<out>/demo.json``)."""
    out = Path(args.out).resolve()
    with OutputLock(out):
        return _run_demo(args, out)


# ------------------------------------------------------------------------------------------ the demo
# _run_demo reads as the demo does: plan (steps, dataset, subsets, checkpoint), one function per step in the
# order of the module docstring, then the summary. Each step is a stage's command line, run by _Steps.run.

@dataclass(frozen=True)
class DemoPlan:
    """What the demo will run, settled before any step starts."""
    out: Path
    model: str
    steps: tuple[str, ...]  # the selected steps (--steps)
    dataset: str  # "imagenette" or "digits"
    imagenette: Path | None
    train_images: int | None  # class-balanced subsets; None: the whole split
    val_images: int | None
    checkpoint: Path  # --checkpoint, or the one the train step writes
    env: dict[str, str] = field(hash=False)
    thread_args: tuple[str, ...] = ()
    py: str = sys.executable

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def train_dir(self) -> Path:
        return self.out / "train"

    @property
    def common(self) -> list[str]:
        """The flags every stage after training takes: the model, the shared output folder and the checkpoint."""
        return ["--model", self.model, "--out", str(self.model_dir), "--checkpoint", str(self.checkpoint)]


def _run_demo(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan = _plan_demo(args, out)
    steps = _Steps(plan, args.verbose)
    t_start = time.perf_counter()
    data_root = _data_step(args, plan, steps)
    _train_step(args, plan, steps, data_root)
    _export_steps(args, plan, steps, data_root)
    _engine_step(plan, steps)
    _bench_step(args, plan, steps)
    _parity_step(args, plan, steps, data_root)
    return _write_summary(args, plan, steps, data_root, time.perf_counter() - t_start)


def _plan_demo(args: argparse.Namespace, out: Path) -> DemoPlan:
    """The selected steps, the dataset and its subsets, the threads and the checkpoint; bad options refused."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    thread_args: tuple[str, ...] = ()
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        thread_args = ("--threads", str(args.threads))
    # Otherwise every step picks its threads itself (--threads auto: the cores idle when it starts).
    steps = [s.strip() for s in args.steps.split(",")] if args.steps else list(STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise DemoError(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")

    dataset = args.dataset
    imagenette = imagenette_root()
    if dataset == "auto":
        dataset = "imagenette" if imagenette else "digits"
    if dataset == "imagenette" and imagenette is None:
        raise DemoError("Imagenette not found at ../shared/data/imagenette2 (set T2T_SHARED_DATA); use --dataset digits")
    # Imagenette is big enough that the demo trains on a class-balanced subset; digits is used whole.
    train_images = args.train_images if args.train_images is not None else (1500 if dataset == "imagenette" else None)
    val_images = args.val_images if args.val_images is not None else (300 if dataset == "imagenette" else None)
    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else out / "train" / "best.pth"
    return DemoPlan(out, args.model, tuple(steps), dataset, imagenette, train_images, val_images, ckpt, env,
                    thread_args)


class _Steps:
    """Runs the steps' commands and keeps their results, in order, and which of them failed."""

    def __init__(self, plan: DemoPlan, verbose: bool):
        self.plan, self.verbose = plan, verbose
        self.results: list[StepResult] = []
        self.failed: set[str] = set()

    @staticmethod
    def say(msg: str) -> None:
        print(msg, flush=True)

    def run(self, name: str, cmd: list[str], needs: Sequence[str] = (), outputs: Sequence[Path] = (),
            label: str | None = None, soft: bool = False) -> StepResult:
        """Run one stage's CLI; ``label`` names the result and log when a step runs several times.

        ``soft``: exit code 1 with every output written means "a quality threshold was missed" (export
        validation, int8 drop, parity): a finding the summary shows, not a reason to stop the demo.
        """
        say, failed, py = self.say, self.failed, self.plan.py
        if name not in self.plan.steps:
            res = StepResult(label or name, "skipped", reason="not selected (--steps)")
        elif any(n in failed for n in needs):
            res = StepResult(label or name, "skipped",
                             reason=f"needs {', '.join(n for n in needs if n in failed)}, which failed")
        else:
            say(f"[demo] {label or name}: {shlex.join(cmd[2:]) if cmd[:2] == [py, '-m'] else shlex.join(cmd)}")
            rc, secs, log = run_logged_step(label or name, cmd, self.plan.logs, self.verbose, self.plan.env)
            outs = [str(p) for p in outputs if Path(p).exists()]
            if rc == 0:
                res = StepResult(label or name, "ok", secs, shlex.join(cmd), str(log), outputs=outs)
            elif soft and rc == 1 and len(outs) == len(outputs):
                res = StepResult(label or name, "warn", secs, shlex.join(cmd), str(log),
                                 reason="missed a quality threshold: see its report", outputs=outs)
                say(f"[demo] {res.step}: done in {secs:.0f} s, but it missed a quality threshold (see its report)")
            else:
                res = StepResult(label or name, "failed", secs, shlex.join(cmd), str(log), reason=f"exit code {rc}",
                                 outputs=outs)
                failed.add(label or name)  # calib-cpu failing does not fail calib
                say(f"[demo] {label or name} FAILED (exit {rc}); last lines of {log}:\n{_tail(log)}")
        self.results.append(res)
        if res.status == "ok":
            say(f"[demo] {res.step}: ok in {res.seconds:.0f} s")
        return res


def _data_step(args: argparse.Namespace, plan: DemoPlan, steps: _Steps) -> Path:
    """1. data: Imagenette where it is, or the digits written as PNG folders; returns the dataset root."""
    t0 = time.perf_counter()
    if plan.dataset == "imagenette":
        data_root = plan.imagenette  # _plan_demo refused Imagenette without it
        steps.results.append(StepResult("data", "ok", time.perf_counter() - t0, reason=f"Imagenette at {data_root}",
                                        outputs=[str(data_root)]))
    else:
        data_root = write_digits_dataset(plan.out / "data" / "digits", size=args.digits_size)
        steps.results.append(StepResult("data", "ok", time.perf_counter() - t0,
                                        reason="scikit-learn digits (1,797 scans) as PNG folders",
                                        outputs=[str(data_root)]))
    steps.say(f"[demo] data: {steps.results[-1].reason} -> {data_root}")
    return data_root


def _train_step(args: argparse.Namespace, plan: DemoPlan, steps: _Steps, data_root: Path) -> None:
    """2. train from scratch (skipped with --checkpoint) -> train/best.pth."""
    dataset, py, train_dir = plan.dataset, plan.py, plan.train_dir
    train_cmd = [py, "-m", "train.train", "--model", args.model, "--img-size", str(args.img_size),
                 "--data", str(data_root), "--out", str(train_dir), "--num-classes", "10",
                 "--epochs", str(args.epochs), "--cooldown-epochs", "0", "--warmup-epochs", "1",
                 "--warmup-lr", "1e-4", "--lr", str(args.lr or (1e-3 if dataset == "imagenette" else 2e-3)),
                 "--min-lr", "1e-5", "--lr-scale", "none",
                 # More, smaller steps: a ViT from scratch learns more from 200 steps than from 100.
                 "--batch-size", "32" if dataset == "imagenette" else "64",
                 "--weight-decay", "0.05", "--aa", "", "--scale", "0.5,1.0",
                 "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0.1", "--drop-path", "0",
                 "--model-ema", "--model-ema-decay", "0.99", "--model-ema-warmup", "--precision", "fp32",
                 "--workers", str(args.workers), "--seed", "0", *plan.thread_args]
    if dataset == "digits":
        train_cmd += ["--hflip", "0"]  # a mirrored digit is another symbol
    else:
        train_cmd += ["--cache-images", str(int(args.img_size * 1.25))]
    if plan.train_images:
        train_cmd += ["--limit-train", str(plan.train_images)]
    if plan.val_images:
        train_cmd += ["--limit-val", str(plan.val_images)]
    if args.checkpoint:
        steps.results.append(StepResult("train", "skipped", reason=f"--checkpoint {plan.checkpoint} given"))
        return
    if "train" in plan.steps and train_dir.is_dir():
        # The demo trains from scratch every time; train.train would resume (or refuse) a run it finds there.
        shutil.rmtree(train_dir)
    steps.run("train", train_cmd, outputs=[train_dir / "best.pth", train_dir / "curves.png", train_dir / "summary.csv"])
    if "train" in plan.steps and not plan.checkpoint.is_file():
        steps.failed.add("train")


def _export_steps(args: argparse.Namespace, plan: DemoPlan, steps: _Steps, data_root: Path) -> None:
    """3. onnx (fp32/fp16 graphs), 4. calib (int8 Q/DQ graph), its CPU target (calib-cpu) and fp8 (calib-fp8)."""
    py, model_dir, common, val_images = plan.py, plan.model_dir, plan.common, plan.val_images
    train_split, val_split = data_root / "train", data_root / "val"
    steps.run("onnx", [py, "-m", "export.to_onnx", *common, "--data", str(val_split),
                       "--val-images", str(min(val_images or 200, 200))],
              needs=["train"], outputs=[model_dir / f"{args.model}.fp32.onnx", model_dir / f"{args.model}.fp16.onnx",
                                        model_dir / f"{args.model}.export.md"], soft=True)

    calib_cmd = [py, "-m", "calibration.calib", *common, "--calib-data", str(train_split),
                 "--calib-size", str(args.calib_size), "--method", args.calib_method, "--val-data", str(val_split),
                 "--workers", str(args.workers), "--no-progress", *plan.thread_args]
    if val_images:
        calib_cmd += ["--val-size", str(val_images)]
    steps.run("calib", calib_cmd, needs=["train", "onnx"],
              outputs=[model_dir / f"{args.model}.int8.onnx", model_dir / f"{args.model}.calib.md"], soft=True)
    # The same calibration for ONNX Runtime's CPU integer kernels (make calib TARGET=cpu): parity's int8-cpu row.
    steps.run("calib", [*calib_cmd, "--target", "cpu"], needs=["train", "onnx"], label="calib-cpu",
              outputs=[model_dir / f"{args.model}.int8-cpu.onnx", model_dir / f"{args.model}.calib-cpu.md"],
              soft=True)
    # And with float8e4m3fn Q/DQ (make calib PRECISION=fp8), from the same cached ranges: parity's fp8 rows.
    steps.run("calib", [*calib_cmd, "--precision", "fp8"], needs=["train", "onnx"], label="calib-fp8",
              outputs=[model_dir / f"{args.model}.fp8.onnx", model_dir / f"{args.model}.calib-fp8.md"], soft=True)


def _engine_step(plan: DemoPlan, steps: _Steps) -> None:
    """5. engine: fp32/fp16/int8 TensorRT engines and fp8 on an SM 8.9+ GPU, or one skipped entry saying why not."""
    trt_ok, trt_why = TensorRTRunner.availability()
    if "engine" not in plan.steps:
        steps.results.append(StepResult("engine", "skipped", reason="not selected (--steps)"))
    elif not trt_ok:
        steps.results.append(StepResult("engine", "skipped", reason=trt_why))
        steps.say(f"[demo] engine: skipped: {trt_why}")
    else:
        for prec in ("fp32", "fp16", "int8", "fp8"):
            short = _gpu_shortfall(plan.model_dir / f"{plan.model}.{prec}.onnx") if prec == "fp8" else ""
            if short:
                steps.results.append(StepResult(f"engine-{prec}", "skipped", reason=short))
                steps.say(f"[demo] engine-{prec}: skipped: {short}")
                continue
            steps.run("engine", [plan.py, "-m", "engines.build", *plan.common, "--precision", prec],
                      needs=["train", "onnx"] + ({"int8": ["calib"], "fp8": ["calib-fp8"]}.get(prec, [])),
                      outputs=[plan.model_dir / f"{plan.model}.{prec}.engine"], label=f"engine-{prec}")


def _gpu_shortfall(graph: Path) -> str:
    """Why this GPU cannot run ``graph`` (the compute capability its metadata records, fp8's 8.9), or ''."""
    if not graph.is_file():
        return ""  # the build step says it is missing (or is skipped: calib-fp8 failed)
    return capability_shortfall(required_compute_capability(read_metadata(graph)), gpu_info(), what=graph.name)


def _bench_step(args: argparse.Namespace, plan: DemoPlan, steps: _Steps) -> None:
    """6. bench: every backend at batch 1 and 8 -> model/bench-engines-*."""
    model_dir = plan.model_dir
    res = steps.run("bench", [plan.py, "-m", "engines.bench", *plan.common, "--precision", "fp16", "--tensorrt", "auto",
                              "--batches", "1,8", "--min-time", str(args.bench_seconds), "--no-progress",
                              *plan.thread_args],
                    needs=["onnx"], outputs=sorted(model_dir.glob("bench-engines-*")) if model_dir.exists() else [])
    if res.status == "ok":
        res.outputs = [str(p) for p in sorted(model_dir.glob("bench-engines-*.md"))]


def _parity_step(args: argparse.Namespace, plan: DemoPlan, steps: _Steps, data_root: Path) -> None:
    """7. parity: every backend against PyTorch on the val images -> model/parity-<model>.*."""
    model_dir, val_split, val_images = plan.model_dir, data_root / "val", plan.val_images
    parity_cmd = [plan.py, "-m", "evaluation.parity", *plan.common, "--data", str(val_split), "--no-progress",
                  "--workers", str(args.workers), *plan.thread_args]
    if val_images:
        parity_cmd += ["--limit", str(val_images)]
    # One image of a few hundred moves top-1 by more than fp16's 0.1-point default, so the demo allows a
    # single flipped image for fp16/bf16 (stated in the report's thresholds); `make parity` on a full
    # val set keeps the defaults.
    n_val = val_images or _count_images(val_split)
    one_image = round(100.0 / max(n_val, 1) + 1e-6, 4)
    for prec, default in (("fp16", 0.1), ("bf16", 0.5)):
        parity_cmd += ["--max-delta-top1", f"{prec}={max(default, one_image)}"]
    steps.run("parity", parity_cmd, needs=["train", "onnx"],
              outputs=[model_dir / f"parity-{args.model}.md", model_dir / f"parity-{args.model}.png",
                       model_dir / f"parity-{args.model}-disagreements.csv"], soft=True)


def _write_summary(args: argparse.Namespace, plan: DemoPlan, steps: _Steps, data_root: Path,
                   total_s: float) -> dict[str, Any]:
    """The summary of every step and the headline numbers -> demo.json and demo-summary.md."""
    summary = {
        "tool": "evaluation.demo",
        "out": str(plan.out),
        "dataset": plan.dataset,
        "data_root": str(data_root),
        "model": args.model,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "checkpoint": str(plan.checkpoint),
        "total_s": total_s,
        "hardware": host_info(),
        "steps": [asdict(r) for r in steps.results],
        "metrics": _collect_metrics(plan.train_dir, plan.model_dir, args.model),
        "ok": not steps.failed,
    }
    atomic_write_json(plan.out / "demo.json", summary)
    text = render_summary(summary)
    atomic_write_text(plan.out / "demo-summary.md", text)
    return summary


def _collect_metrics(train_dir: Path, model_dir: Path, model: str) -> dict[str, Any]:
    """A few headline numbers from the stage reports (best effort: missing files give no entry)."""
    m: dict[str, Any] = {}
    summary_csv = train_dir / "summary.csv"
    if summary_csv.is_file():
        import csv

        rows = list(csv.DictReader(summary_csv.open()))
        if rows:
            def f(v: str | None) -> float:
                try:
                    return float(v) if v not in (None, "") else float("nan")
                except ValueError:
                    return float("nan")

            m["train_best_ema_top1"] = max(f(r.get("ema_top1")) for r in rows)
            m["train_epochs"] = len(rows)
    parity = model_dir / f"parity-{model}.json"
    if parity.is_file():
        rep = json.loads(parity.read_text())
        m["parity"] = {b["name"]:
                       ({"top1": round(b["top1"], 2), "delta": round(b.get("delta_top1", 0.0), 2),
                         "agreement": round(b.get("top1_agreement", 100.0), 2), "status": b["status"],
                         "emulated": bool(b.get("emulated"))}
                        if "top1" in b else {"status": b["status"], "reason": b["reason"]})
                       for b in rep["backends"]}
        m["parity_images"] = rep["data"]["images_evaluated"]
        m["parity_passed"] = rep["passed"]
    return m


def _show(path: str) -> str:
    """A path relative to the working directory when it lies below it (shorter, and what users typed)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def render_summary(s: dict[str, Any]) -> str:
    """The one-screen summary (plain text that is also valid Markdown)."""
    hw = s["hardware"]
    lines = [f"# T2T-ViT demo: {s['model']} at {s['img_size']} px on {s['dataset']} "
             f"({s['total_s'] / 60:.1f} min, {hw['cpu']}, {hw['cpu_cores']} cores)", ""]
    width = max([7] + [len(r["step"]) for r in s["steps"]])  # engine-int8, calib-cpu: columns stay aligned
    for r in s["steps"]:
        head = f"- {r['step']:<{width}} {r['status']:<7}"
        if r["seconds"]:
            head += f" {r['seconds']:5.0f} s"
        lines.append(head)
        if r["reason"]:  # wrapped at word boundaries, never cut mid-word
            lines += textwrap.wrap(f"({r['reason']})", width=100, initial_indent="    ", subsequent_indent="     ")
        for o in r["outputs"][:4]:
            lines.append(f"    {_show(o)}")
        if r["status"] == "failed" and r["log"]:
            lines.append(f"    log: {_show(r['log'])}")
    m = s["metrics"]
    if "train_best_ema_top1" in m:
        lines += ["", f"trained {m['train_epochs']} epochs: best EMA top-1 {m['train_best_ema_top1']:.1f}% (val)"]
    if "parity" in m:
        lines += ["", f"parity on {m['parity_images']} val images ({'PASS' if m['parity_passed'] else 'FAIL'}):"]
        skipped: dict[str, list[str]] = {}
        # A reason a step above already printed (TensorRT missing: the engine step's) is named, not repeated.
        said = {r["reason"]: r["step"] for r in s["steps"] if r["status"] == "skipped" and r["reason"]}
        for name, p in m["parity"].items():
            if "top1" in p:
                lines.append(f"    {name:<30} top-1 {p['top1']:6.2f}  delta {p['delta']:+.2f}  "
                             f"agree {p['agreement']:6.2f}%  {p['status']}{' (emulated)' if p.get('emulated') else ''}")
            else:
                why = f"see the {said[p['reason']]} step" if p["reason"] in said else p["reason"]
                skipped.setdefault(f"{p['status']}: {why}", []).append(name)
        for reason, names in skipped.items():  # one entry per reason: TensorRT's is the same for 3 engines
            lines += textwrap.wrap(f"{', '.join(names)}: {reason}", width=100, initial_indent="    ",
                                   subsequent_indent="      ")
    lines += ["", f"everything is under {_show(s['out'])}/ (logs/ holds each step's output); "
                  f"this summary: {_show(s['out'])}/demo-summary.md", ""]
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train, export, quantize, build, benchmark and check parity of a small "
                                            "T2T-ViT on a CPU in minutes", add_help=add_help)
    p.add_argument("--out", default="artifacts/demo", help="demo folder (default artifacts/demo)")
    p.add_argument("--dataset", choices=("auto", "imagenette", "digits"), default="auto",
                   help="auto: Imagenette when ../shared/data holds it, else scikit-learn digits")
    p.add_argument("--model", default="t2t_vit_7", help="registered model (default t2t_vit_7)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size, a multiple of 16 (default: 32 for digits, 64 for Imagenette)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 8 digits, 4 Imagenette)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 digits, 1e-3 Imagenette)")
    p.add_argument("--train-images", type=int, default=None,
                   help="class-balanced training subset (default: all digits, 1500 Imagenette)")
    p.add_argument("--val-images", type=int, default=None,
                   help="class-balanced validation/parity subset (default: all digits, 300 Imagenette)")
    p.add_argument("--calib-size", type=int, default=128, help="calibration images (default 128)")
    p.add_argument("--calib-method", default="max",
                   help="calibration method (default max: one pass, no histograms; entropy is make calib's default)")
    p.add_argument("--digits-size", type=int, default=72, help="pixel size of the written digit PNGs (default 72)")
    p.add_argument("--bench-seconds", type=float, default=0.5, help="bench: timed seconds per batch size (default 0.5)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes per step (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / ONNX Runtime threads per step (default: their own choice). On a busy shared "
                        "CPU, 1 avoids OpenMP threads spinning against each other")
    p.add_argument("--checkpoint", default=None, help="skip training and use this checkpoint")
    p.add_argument("--steps", default=None, help=f"comma list of steps to run (default all: {', '.join(STEPS)})")
    p.add_argument("--verbose", action="store_true", help="stream every step's output (it always goes to logs/)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    imagenette = args.dataset == "imagenette" or (args.dataset == "auto" and imagenette_root() is not None)
    # 8x8 digit scans carry no detail beyond 32 px; 4x fewer tokens than 64 px keeps the demo in minutes.
    if args.img_size is None:
        args.img_size = 64 if imagenette else 32
    if args.epochs is None:
        args.epochs = 4 if imagenette else 8

    def body() -> int:
        summary = run_demo(args)
        print()
        print(render_summary(summary))
        failed = [r["step"] for r in summary["steps"] if r["status"] == "failed"]
        if failed:
            raise DemoError(f"steps {', '.join(failed)} failed; their logs are under {summary['out']}/logs/")
        warned = [r["step"] for r in summary["steps"] if r["status"] == "warn"]
        if warned:
            raise ThresholdMissed(f"steps {', '.join(warned)} missed a quality threshold (see their reports)")
        return 0

    return run_command(body, "evaluation.demo")


if __name__ == "__main__":
    raise SystemExit(main())
