"""Latency and throughput of a TensorRT engine against what users would run instead (``make bench``).

One report per model holds:

* TensorRT: a trtexec batch sweep (default 1, 8, 32, 128) over ``<out>/<model>.<precision>.engine``,
  with the flags that make 10.x time like 11.x (:mod:`engines.trtexec`); the exact command lines, logs
  and TensorRT version are recorded. trtexec times GPU work only (CUDA graphs, no host<->device copies).
* Baselines through the shared runners (:mod:`engines.runners`): ONNX Runtime on the CPU (and CUDA) for
  every ``<out>/<model>.{fp32,fp16,int8}.onnx`` present, PyTorch eager on the CPU, and on a GPU PyTorch
  eager fp32 / fp16 / bf16 autocast and ``torch.compile``. Baselines are timed end to end through
  ``Runner.infer`` (host tensor in, host logits out), i.e. including copies on a GPU.

Outputs ``bench-engines-<model>-<img>-<device>[-trt-<precision>].{json,md,png}`` under ``--out`` and, with
``--report-dir reports``, the same files there. Without TensorRT, ``--tensorrt require`` (``make bench``)
stops before doing anything; ``auto``/``off`` (``make bench-baselines``) write the baselines and say
in the report why the TensorRT part did not run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from engines.trt_compat import INSTALL_HINT, parse_version
from t2t_vit.env import host_info
from t2t_vit.files import atomic_write, atomic_write_json, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = ["BenchError", "TrtPlan", "plan_tensorrt", "latency_stats", "time_runner", "onnx_files",
           "report_stem", "render_markdown", "plot_report", "write_report", "run_bench", "get_args_parser", "main"]

DEFAULT_BATCHES = (1, 8, 32, 128)
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
BASELINE_BACKENDS = ("ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16",
                     "torch-cuda-compile")


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------
# TensorRT part: decide up front whether it runs (so `require` fails before anything is written)
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrtPlan:
    """Whether the trtexec sweep runs, and if not, why."""

    run: bool
    reason: str = ""
    trtexec: str | None = None
    version: str | None = None
    engine: Path | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)


def _same_release(a: str, b: str) -> bool:
    # trtexec's tag has major.minor.patch; tensorrt.__version__ adds the build number.
    return parse_version(a)[:3] == parse_version(b)[:3]


def plan_tensorrt(mode: str, engine: Path, trtexec: str | None = None,
                  gpu: Callable[[], dict[str, str]] | None = None) -> TrtPlan:
    """Check trtexec, the GPU, the engine and its sidecar; nothing is written.

    Args:
        mode: ``require`` (raise when anything is missing), ``auto`` (skip with the reason) or ``off``.
        engine: the engine to time.
        trtexec: binary path (default: ``$TRTEXEC`` or PATH).
        gpu: returns ``{"name", "compute_capability"}`` of the running GPU (default: via PyTorch).

    Raises:
        BenchError: ``mode == "require"`` and the sweep cannot run.
    """
    from engines.sidecar import EngineMismatchError, SidecarError, check_sidecar, read_sidecar
    from engines.trt_compat import TensorRTUnavailable, gpu_info
    from engines.trtexec import TrtexecError, find_trtexec, trtexec_version

    if mode not in ("require", "auto", "off"):
        raise BenchError(f"--tensorrt {mode!r}: use require, auto or off")
    problems: list[str] = []
    plan = TrtPlan(run=False, engine=engine)
    try:
        plan.trtexec = find_trtexec(trtexec)
        plan.version = trtexec_version(plan.trtexec)
    except TrtexecError as e:
        problems.append(str(e))
    try:
        running_gpu = (gpu or gpu_info)()
    except TensorRTUnavailable as e:
        running_gpu = None
        problems.append(str(e))
    if not engine.is_file():
        problems.append(f"engine {engine} not found (build it with `make engine`)")
    elif not problems:
        try:
            plan.sidecar = read_sidecar(engine)
            built = plan.sidecar["tensorrt_version"]
            check_sidecar(plan.sidecar, tensorrt_version=built if _same_release(built, plan.version) else plan.version,
                          gpu_name=running_gpu["name"], compute_capability=running_gpu["compute_capability"],
                          engine_path=engine)
        except (SidecarError, EngineMismatchError) as e:
            problems.append(str(e))
    if not problems:
        if mode == "off":
            return TrtPlan(run=False, reason="disabled with --tensorrt off", trtexec=plan.trtexec,
                           version=plan.version, engine=engine, sidecar=plan.sidecar)
        plan.run = True
        return plan
    plan.reason = "; ".join(problems)
    if mode == "require":
        listed = "".join(f"\n  - {p}" for p in problems)
        raise BenchError(f"the TensorRT benchmark cannot run:{listed}\nTo install TensorRT: {INSTALL_HINT}.\n"
                         f"To time only the ONNX Runtime/PyTorch baselines here: `make bench-baselines`.")
    if mode == "off":
        plan.reason = f"disabled with --tensorrt off (and: {plan.reason})"
    return plan


def run_tensorrt(plan: TrtPlan, batches: Sequence[int], out: Path, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The trtexec sweep: (rows for the table, per-run records with command lines and logs)."""
    from engines.trtexec import TimingBudget, TrtexecError, run_trtexec, trtexec_command

    assert plan.engine is not None and plan.version is not None and plan.trtexec is not None
    (input_name, shapes), = list(plan.sidecar["profile"].items())[:1]
    lo, hi = shapes["min"][0], shapes["max"][0]
    chw = shapes["opt"][1:]
    budget = TimingBudget(args.warmup_ms, args.duration, args.iterations)
    rows, runs = [], []
    for batch in batches:
        if not lo <= batch <= hi:
            runs.append({"batch": batch, "skipped": f"outside the engine profile [{lo}, {hi}]"})
            continue
        stem = f"trtexec-{plan.engine.stem}-b{batch}"
        cmd = trtexec_command(plan.engine, batch, chw, plan.version, input_name=input_name, binary=plan.trtexec,
                              budget=budget, export_times=out / f"{stem}.times.json")
        _logger.info("running %s", shlex.join(cmd))
        try:
            summary = run_trtexec(cmd, out / f"{stem}.log", batch)
        except TrtexecError as e:
            runs.append({"batch": batch, "command": shlex.join(cmd), "error": str(e)})
            continue
        runs.append({"batch": batch, **summary})
        rows.append({
            "backend": f"tensorrt-{plan.sidecar['precision']}", "precision": plan.sidecar["precision"],
            "device": plan.sidecar["gpu"]["name"], "batch": batch, "source": "trtexec",
            "latency_ms": summary["latency_ms"], "gpu_compute_ms": summary["gpu_compute_ms"],
            "images_per_s": summary["images_per_s"], "iterations": None,
        })
    return rows, runs


# ----------------------------------------------------------------------------------------------------
# Baselines through the shared runners
# ----------------------------------------------------------------------------------------------------
def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted values."""
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """min/max/mean/median/p90/p95/p99 in milliseconds of per-iteration times in seconds."""
    if not seconds:
        raise ValueError("no timings")
    ms = sorted(float(s) * 1e3 for s in seconds)
    return {"min": ms[0], "max": ms[-1], "mean": statistics.fmean(ms), "median": statistics.median(ms),
            "p90": _percentile(ms, 90), "p95": _percentile(ms, 95), "p99": _percentile(ms, 99)}


def time_runner(runner: Any, images: Any, min_time_s: float = 1.0, min_iters: int = 3, warmup: int = 1,
                max_iters: int = 1000, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per ``runner.infer(images)`` call: ``warmup`` untimed calls, then at least ``min_iters``
    calls and ``min_time_s`` seconds (at most ``max_iters`` calls)."""
    for _ in range(warmup):
        runner.infer(images)
    times: list[float] = []
    start = clock()
    while len(times) < max_iters and (len(times) < min_iters or clock() - start < min_time_s):
        t0 = clock()
        runner.infer(images)
        times.append(clock() - t0)
    return times


def onnx_files(out: Path, model: str) -> dict[str, Path]:
    """The typed ONNX graphs of ``model`` present in ``out``: precision -> path."""
    return {p: out / f"{model}.{p}.onnx" for p in ONNX_PRECISIONS if (out / f"{model}.{p}.onnx").is_file()}


def _baseline_factories(args: argparse.Namespace, out: Path, img_size: int) -> tuple[list[tuple[str, Callable[[], Any]]], list[dict]]:
    """(name, runner factory) for every wanted baseline that can run here, and the skipped ones with why."""
    import torch

    from engines.runners import OnnxRuntimeRunner, TorchRunner

    wanted = set(args.backends or BASELINE_BACKENDS)
    factories: list[tuple[str, Callable[[], Any]]] = []
    skipped: list[dict] = []

    graphs = onnx_files(out, args.model)
    for provider in ("cpu", "cuda"):
        key = f"ort-{provider}"
        if key not in wanted:
            continue
        ok, why = OnnxRuntimeRunner.availability(provider)
        if not ok:
            skipped.append({"backend": key, "reason": why})
            continue
        for precision in ONNX_PRECISIONS:
            if precision not in graphs:
                skipped.append({"backend": f"onnxruntime-{provider}-{precision}",
                                "reason": f"{out / f'{args.model}.{precision}.onnx'} not found "
                                          f"(`make {'calib' if precision == 'int8' else 'onnx'}`)"})
                continue
            factories.append((f"onnxruntime-{provider}-{precision}",
                              lambda p=graphs[precision], prov=provider: OnnxRuntimeRunner(p, provider=prov,
                                                                                           threads=args.threads)))

    torch_variants = [("torch-cpu", "cpu", None, False), ("torch-cuda", "cuda", None, False),
                      ("torch-cuda-fp16", "cuda", torch.float16, False), ("torch-cuda-bf16", "cuda", torch.bfloat16, False),
                      ("torch-cuda-compile", "cuda", None, True)]
    model_holder: dict[str, Any] = {}

    def get_model():
        if "m" not in model_holder:
            from t2t_vit.checkpoint import build_model

            if args.checkpoint is None:
                _logger.warning("no --checkpoint: PyTorch baselines use RANDOM weights (timings are unaffected)")
            model_holder["m"] = build_model(args.model, args.checkpoint, img_size=img_size).eval()
        return model_holder["m"]

    for key, device, dtype, compile_ in torch_variants:
        if key not in wanted:
            continue
        ok, why = TorchRunner.availability(device)
        if not ok:
            skipped.append({"backend": key, "reason": why})
            continue
        factories.append((key, lambda d=device, dt=dtype, c=compile_: TorchRunner(get_model(), device=d,
                                                                                 autocast_dtype=dt, compile=c)))
    return factories, skipped


def run_baselines(args: argparse.Namespace, out: Path, img_size: int, batches: Sequence[int]) -> tuple[list[dict], list[dict]]:
    """Time every available baseline over ``batches``: (rows, skipped backends with reasons)."""
    import torch
    from tqdm import tqdm

    factories, skipped = _baseline_factories(args, out, img_size)
    threads_before = torch.get_num_threads()
    if args.threads:
        # OpenMP threads that outnumber the free cores spin at barriers: on a shared machine one
        # thread per library gives steadier (and often faster) CPU timings.
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, img_size, img_size, generator=gen) for b in batches}
    rows: list[dict] = []
    bar = tqdm(total=len(factories) * len(batches), desc="baselines", unit="run", disable=args.quiet)
    for key, factory in factories:
        try:
            runner = factory()
            with runner:
                device = getattr(runner, "device", None) or getattr(runner, "provider", "cpu")
                for batch in batches:
                    bar.set_postfix_str(f"{runner.name} b{batch}")
                    secs = time_runner(runner, images[batch], args.min_time, args.min_iters, args.warmup)
                    stats = latency_stats(secs)
                    rows.append({"backend": runner.name, "precision": runner.precision, "device": str(device),
                                 "batch": batch, "source": "runner", "latency_ms": stats, "gpu_compute_ms": None,
                                 "images_per_s": batch / (stats["mean"] / 1e3), "iterations": len(secs)})
                    bar.update(1)
        except Exception as e:  # one failing baseline must not sink the others; the reason is reported
            _logger.warning("%s failed: %s", key, e)
            skipped.append({"backend": key, "reason": f"failed: {type(e).__name__}: {e}"})
    bar.close()
    torch.set_num_threads(threads_before)
    return rows, skipped


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def report_stem(model: str, img_size: int, host: dict[str, Any], trt_precision: str | None) -> str:
    """``bench-engines-<model>-<img>-<cpu|gpu-name>[-trt-<precision>]``."""
    device = _slug(host["gpu"]["name"]) if host.get("gpu") else "cpu"
    return f"bench-engines-{model}-{img_size}-{device}" + (f"-trt-{trt_precision}" if trt_precision else "")


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: what ran where, the table, and why anything did not run."""
    host = report["host"]
    trt = report["tensorrt"]
    timing = report.get("timing", {})
    gpu = host["gpu"]["name"] if host.get("gpu") else "none"
    lines = [
        f"# Inference benchmark: {report['model']} at {report['img_size']} px",
        "",
        f"Produced by `{report['command']}` on {report['created']}.",
        "",
        f"- CPU: {host['cpu']} ({host['cpu_cores']} cores, {host.get('cpu_cores_usable')} usable); GPU: {gpu}",
        f"- torch {host['torch']}, onnxruntime {host.get('onnxruntime')}, "
        f"TensorRT {trt.get('version') or 'not used'}",
        f"- Weights: {report.get('weights')}",
        f"- Baseline timing: {timing.get('warmup')} warmup call(s), then at least {timing.get('min_iters')} calls and "
        f"{timing.get('min_time_s')} s per batch; CPU threads: {timing.get('cpu_threads')}",
    ]
    for precision, g in (report.get("onnx_graphs") or {}).items():
        extra = ", ".join(f"{k} {g[k]}" for k in _GRAPH_KEYS if k in g and k != "precision")
        lines.append(f"- ONNX {precision}: `{g['path']}` ({g['size_mb']} MB; {extra})")
    load = host.get("load_avg_1m") or {}
    if load.get("before") is not None:
        busy = max(load["before"], load.get("after") or 0) > (host.get("cpu_cores_usable") or host["cpu_cores"] or 1)
        lines.append(f"- Load average (1 min) before / after the run: {load['before']} / {load.get('after')}"
                     + (" -- more runnable processes than cores: other work shared the CPU, so absolute CPU "
                        "timings are pessimistic and noisy; compare rows of this report with that in mind"
                        if busy else ""))
    lines += [
        "",
        "## TensorRT",
        "",
    ]
    if trt["ran"]:
        lines += [f"trtexec {trt['version']} on `{trt['engine']}` (built with TensorRT "
                  f"{trt['sidecar'].get('tensorrt_version')} on {trt['sidecar'].get('gpu', {}).get('name')}). "
                  "Commands:", ""]
        lines += [f"- batch {r['batch']}: `{r.get('command', '')}`" + (f" (failed: {r['error']})" if 'error' in r else "")
                  + (f" ({r['skipped']})" if 'skipped' in r else "") for r in trt["runs"]]
    else:
        lines += [f"**The TensorRT part did not run**: {trt['reason']}"]
    lines += ["", "## Results", "",
              "Latency per batch in ms (TensorRT rows: trtexec's host latency with CUDA graphs and no data "
              "transfers; baseline rows: `Runner.infer` end to end, host tensor in, host logits out). "
              "images/s = batch / mean latency (TensorRT: qps x batch).", "",
              "| backend | precision | device | batch | median ms | mean ms | p90 ms | p99 ms | GPU compute ms | images/s | iters |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lat = r["latency_ms"]
        gpu_ms = (r.get("gpu_compute_ms") or {}).get("median")
        lines.append(f"| {r['backend']} | {r['precision']} | {r['device']} | {r['batch']} | {_fmt(lat['median'])} | "
                     f"{_fmt(lat['mean'])} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_fmt(gpu_ms)} | "
                     f"{_fmt(r['images_per_s'], 1)} | {_fmt(r.get('iterations'))} |")
    if not report["rows"]:
        lines.append("| (nothing ran) | | | | | | | | | | |")
    if report["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {s['backend']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """PNG: median latency and images/s against batch, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in report["rows"]:
        series.setdefault(r["backend"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        ax1.plot(xs, [r["latency_ms"]["median"] for r in rows], marker="o", label=name)
        ax2.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=name)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    batches = sorted({r["batch"] for r in report["rows"]})
    for ax, title, ylabel in ((ax1, "latency (median)", "ms per batch"), (ax2, "throughput", "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if batches:  # label the batch sizes that ran, as plain numbers
            ax.set_xticks(batches)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if series:
        ax2.legend(fontsize=8, loc="best")
    fig.suptitle(f"{report['model']} @ {report['img_size']} px")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    return [atomic_write_json(folder / f"{stem}.json", report),
            atomic_write_text(folder / f"{stem}.md", render_markdown(report)),
            plot_report(report, folder / f"{stem}.png")]


def _resolve_img_size(args: argparse.Namespace, out: Path) -> int:
    if args.img_size:
        return int(args.img_size)
    from engines.build import inspect_onnx

    for path in onnx_files(out, args.model).values():
        dims = next(iter(inspect_onnx(path).inputs.values()))
        if isinstance(dims[-1], int):
            return int(dims[-1])
    from t2t_vit.model import ARCHS  # noqa: F401  (registry import registers the timm entry points)
    import timm

    cfg = timm.models.get_pretrained_cfg(args.model)
    return int(cfg.input_size[-1]) if cfg is not None else 224


_GRAPH_KEYS = ("precision", "checkpoint_sha256", "opset", "exporter", "patterns", "float_dtype", "calib_method",
               "calib_policy", "calib_size", "quantized_nodes")


def describe_graphs(out: Path, model: str) -> dict[str, dict[str, Any]]:
    """Where each timed ONNX graph came from: path, size and the provenance keys of its metadata."""
    from engines.build import inspect_onnx

    graphs = {}
    for precision, path in onnx_files(out, model).items():
        meta = inspect_onnx(path).metadata
        graphs[precision] = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 1),
                             **{k: meta[k] for k in _GRAPH_KEYS if meta.get(k)}}
    return graphs


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_bench(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Plan, time and write the report; returns it."""
    out = Path(args.out) if args.out else Path("artifacts") / args.model
    batches = sorted(set(args.batches))
    if any(b < 1 for b in batches):
        raise BenchError(f"--batches must be positive, got {batches}")
    engine = Path(args.engine) if args.engine else out / f"{args.model}.{args.precision}.engine"
    # TensorRT first: with --tensorrt require this raises before anything is read or written.
    plan = plan_tensorrt(args.tensorrt, engine, args.trtexec)
    img_size = _resolve_img_size(args, out)

    out.mkdir(parents=True, exist_ok=True)
    load_before = _load_avg()
    trt_rows, trt_runs = run_tensorrt(plan, batches, out, args) if plan.run else ([], [])
    base_rows, skipped = run_baselines(args, out, img_size, args.baseline_batches or batches)
    # Other processes on the machine distort timings; the report says how busy it was.
    host = {**host_info(), "load_avg_1m": {"before": load_before, "after": _load_avg()}}
    report = {
        "kind": "bench-engines",
        "model": args.model,
        "img_size": img_size,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m engines.bench " + shlex.join(list(argv) if argv is not None else sys.argv[1:]),
        "weights": args.checkpoint or "random (no --checkpoint; timings do not depend on weights)",
        "onnx_graphs": describe_graphs(out, args.model),
        "host": host,
        "timing": {"min_time_s": args.min_time, "min_iters": args.min_iters, "warmup": args.warmup,
                   "cpu_threads": args.threads or "library default",
                   "trtexec": {"warmup_ms": args.warmup_ms, "duration_s": args.duration, "iterations": args.iterations}},
        "tensorrt": {"ran": plan.run, "reason": None if plan.run else plan.reason, "version": plan.version,
                     "trtexec": plan.trtexec, "engine": str(engine), "precision": args.precision,
                     "sidecar": plan.sidecar, "runs": trt_runs},
        "rows": trt_rows + base_rows,
        "skipped": skipped,
    }
    stem = report_stem(args.model, img_size, host, args.precision if plan.run else None)
    paths = write_report(report, out, stem)
    if args.report_dir:
        paths += write_report(report, Path(args.report_dir), stem)
    report["written"] = [str(p) for p in paths]
    return report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="trtexec batch sweep of a TensorRT engine plus ONNX Runtime / "
                                            "PyTorch baselines, as JSON + Markdown + PNG", add_help=add_help)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--checkpoint", default=None, help="weights for the PyTorch baselines (default: random; timing only)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the ONNX graph's, else the registry's)")
    p.add_argument("--out", default=None, help="artifact folder (default: artifacts/<model>)")
    p.add_argument("--precision", choices=ONNX_PRECISIONS, default="fp16",
                   help="which engine to time: <out>/<model>.<precision>.engine (default fp16)")
    p.add_argument("--engine", default=None, help="engine path instead of <out>/<model>.<precision>.engine")
    p.add_argument("--tensorrt", choices=("require", "auto", "off"), default="auto",
                   help="require: stop at once without trtexec/GPU/engine (make bench); auto: skip the TensorRT "
                        "part with the reason; off: baselines only (default auto)")
    p.add_argument("--trtexec", default=None, help="trtexec binary (default $TRTEXEC, then PATH)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES),
                   help=f"batch sizes (default {' '.join(map(str, DEFAULT_BATCHES))})")
    p.add_argument("--baseline-batches", type=int, nargs="+", default=None,
                   help="batch sizes for the baselines (default: --batches; CPUs may want fewer)")
    p.add_argument("--backends", nargs="+", choices=BASELINE_BACKENDS, default=None,
                   help="baselines to run (default: every one available here)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads for ONNX Runtime and PyTorch (default: each library's own)")
    p.add_argument("--min-time", type=float, default=1.0, help="baselines: seconds of timed calls per batch (default 1)")
    p.add_argument("--min-iters", type=int, default=3, help="baselines: at least this many timed calls (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="baselines: untimed calls first (default 1)")
    p.add_argument("--warmup-ms", type=int, default=500, help="trtexec --warmUp in ms (default 500)")
    p.add_argument("--duration", type=float, default=10.0, help="trtexec --duration in s (default 10)")
    p.add_argument("--iterations", type=int, default=100, help="trtexec --iterations (default 100)")
    p.add_argument("--report-dir", default=None, help="also write the report here (e.g. reports)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_bench(args, argv)
    except BenchError as e:
        print(f"error: {e}\n(nothing was written)", file=sys.stderr)
        return 2
    for r in report["rows"]:
        print(f"{r['backend']:<28} b{r['batch']:<4} median {r['latency_ms']['median']:9.2f} ms  "
              f"{r['images_per_s']:10.1f} images/s")
    if not report["tensorrt"]["ran"]:
        print(f"TensorRT part did not run: {report['tensorrt']['reason']}")
    print("wrote " + ", ".join(report["written"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
