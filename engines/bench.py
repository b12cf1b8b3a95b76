"""Latency and throughput of a TensorRT engine against what users would run instead (``make bench``).

One report per model holds:

* TensorRT: a trtexec batch sweep (default 1, 8, 32, 128) over ``<out>/<model>.<precision>.engine``,
  with the flags that make 10.x time like 11.x (:mod:`engines.trtexec`); the exact command lines, logs
  and TensorRT version are recorded. trtexec times GPU work only (CUDA graphs, no host<->device copies).
* Baselines through the shared runners (made by :func:`engines.backends.resolve_backend`): ONNX Runtime on the CPU (and CUDA) for
  every ``<out>/<model>.{fp32,fp16,int8,int8-cpu,fp8}.onnx`` present, PyTorch eager on the CPU, and on a GPU
  PyTorch eager fp32 / fp16 / bf16 autocast and ``torch.compile``. Baselines are timed end to end through
  ``Runner.infer`` (host tensor in, host logits out), i.e. including copies on a GPU. ONNX Runtime only
  emulates the fp8 graph (:data:`EMULATED`): its rows say ``fp8 (emulated)``.

Outputs ``bench-engines-<model>-<img>-<device>[-trt-<precision>].{json,md,png}`` under ``--out`` and, with
``--report reports/``, the same files there. Without TensorRT, ``--tensorrt require`` (``make bench``)
stops before doing anything; ``auto``/``off`` (``make bench-baselines``) write the baselines and say
in the report why the TensorRT part did not run.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from t2t_vit.artifacts import ENGINE_PRECISIONS, GRAPH_PRECISIONS, default_out, onnx_path
from t2t_vit.backends import BackendSpec, parse_backend, select_backends
from t2t_vit.checkpoint import build_model, trained_like_
from t2t_vit.cli import add_run_args, add_stage_args, apply_threads, comma_list, run_command
from t2t_vit.errors import T2TError
from t2t_vit.files import OutputLock, file_sha256
from t2t_vit.graphs import expect_graph, graph_inputs, read_metadata
from t2t_vit.reports import host_line, pyplot, report_header, write_report
from t2t_vit.runners import Runner
from t2t_vit.timing import latency_stats, load_average, time_calls

from .backends import Skip, resolve_backend
from .sidecar import EngineMismatchError, SidecarError, check_requirements, check_sidecar, read_sidecar
from .trt_compat import INSTALL_HINT, TensorRTUnavailable, UnsupportedPlatform, gpu_info, parse_version
from .trtexec import TimingBudget, TrtexecError, find_trtexec, run_trtexec, trtexec_command, trtexec_version

_logger = logging.getLogger(__name__)

__all__ = ["EMULATED", "BenchError", "TrtPlan", "plan_tensorrt", "time_runner", "onnx_files", "checked_graphs", "baseline_backends",
           "report_stem", "render_markdown", "plot_report", "run_bench", "get_args_parser", "main"]

DEFAULT_BATCHES = (1, 8, 32, 128)
ONNX_PRECISIONS = GRAPH_PRECISIONS
# Graph precisions ONNX Runtime only emulates: it runs the float8e4m3fn Q/DQ (rounding to FP8 and back) and
# multiplies the dequantized fp16/fp32 values; no FP8 GEMM. Their rows time the emulation, not FP8 hardware.
EMULATED = {"fp8": "ONNX Runtime emulates FP8: float8e4m3fn Q/DQ rounding, then fp16/fp32 MatMul (no FP8 GEMM)"}


def baseline_backends() -> list[BackendSpec]:
    """Every baseline this benchmark knows (the --backends vocabulary): ONNX Runtime on both providers, then
    PyTorch eager fp32 on the CPU and, on a GPU, fp32, fp16/bf16 autocast and ``torch.compile``."""
    return ([BackendSpec("onnxruntime", prov, p) for prov in ("cpu", "cuda") for p in ONNX_PRECISIONS]
            + [BackendSpec("pytorch", "cpu", "fp32"), BackendSpec("pytorch", "cuda", "fp32"),
               BackendSpec("pytorch", "cuda", "fp16"), BackendSpec("pytorch", "cuda", "bf16"),
               BackendSpec("pytorch", "cuda", "fp32", compile=True)])


class BenchError(T2TError, RuntimeError):
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
                  gpu: Callable[[], dict[str, str]] | None = None, precision: str | None = None) -> TrtPlan:
    """Check trtexec, the GPU, the engine and its sidecar; nothing is written.

    Args:
        mode: ``require`` (raise when anything is missing), ``auto`` (skip with the reason) or ``off``.
        engine: the engine to time.
        trtexec: binary path (default: ``$TRTEXEC`` or PATH).
        gpu: returns ``{"name", "compute_capability"}`` of the running GPU (default: via PyTorch).
        precision: the engine precision asked for (``--precision``); the sidecar's must equal it.

    Raises:
        BenchError: ``mode == "require"`` and the sweep cannot run.
    """
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
            if precision and plan.sidecar["precision"] != precision:
                raise EngineMismatchError(f"{engine} is a {plan.sidecar['precision']} engine (its sidecar), not the "
                                          f"{precision} engine asked for: pass its --precision, or build the "
                                          f"{precision} one with `make engine PRECISION={precision}`")
            check_requirements(plan.sidecar, gpu=running_gpu, engine_path=engine)  # fp8: SM 8.9+, said first
            built = plan.sidecar["tensorrt_version"]
            check_sidecar(plan.sidecar, tensorrt_version=built if _same_release(built, plan.version) else plan.version,
                          gpu_name=running_gpu["name"], compute_capability=running_gpu["compute_capability"],
                          engine_sha256=file_sha256(engine), engine_path=engine)
        except (SidecarError, EngineMismatchError, UnsupportedPlatform) as e:
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
def time_runner(runner: Any, images: Any, min_time_s: float = 1.0, min_iters: int = 3, warmup: int = 1,
                max_iters: int = 1000, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per ``runner.infer(images)`` call (:func:`t2t_vit.timing.time_calls`)."""
    return time_calls(lambda: runner.infer(images), warmup=warmup, min_iters=min_iters, min_time_s=min_time_s,
                      max_iters=max_iters, clock=clock)


def onnx_files(out: Path, model: str) -> dict[str, Path]:
    """The typed ONNX graphs of ``model`` present in ``out``: precision -> path."""
    return {p: onnx_path(out, model, p) for p in ONNX_PRECISIONS if onnx_path(out, model, p).is_file()}


def checked_graphs(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The ONNX graphs the selected baselines will time (precision -> path), each checked for its recorded
    model, precision and (with --checkpoint) checkpoint before anything is timed
    (:func:`t2t_vit.graphs.expect_graph`): another model's graph, or an fp16 graph in the fp32 slot, is
    refused, not timed under the wrong name.

    Raises:
        GraphError: a graph that is unreadable or not the one its name promises (the message names the fix).
    """
    wanted = select_backends(args.backends, baseline_backends())
    precisions = {s.precision for s in wanted if s.runtime == "onnxruntime"}
    ckpt_sha = file_sha256(args.checkpoint) if args.checkpoint else None
    graphs = {p: path for p, path in onnx_files(out, args.model).items() if p in precisions}
    for precision, path in graphs.items():
        expect_graph(path, model=args.model, precision=precision, checkpoint_sha=ckpt_sha,
                     checkpoint=args.checkpoint, out=out)
    return graphs


def _baseline_runners(args: argparse.Namespace, out: Path, img_size: int, threads: int,
                      ) -> tuple[list[tuple[str, Runner]], list[dict]]:
    """(name, runner) for every selected baseline that can run here (:func:`engines.backends.resolve_backend`),
    and the skipped ones with why."""
    model_holder: dict[str, Any] = {}

    def get_model() -> torch.nn.Module:
        if "m" not in model_holder:
            model_holder["m"] = build_model(args.model, args.checkpoint, img_size=img_size,
                                            weights=args.weights).eval()
            if args.checkpoint is None:
                _logger.warning("no --checkpoint: PyTorch baselines use RANDOM weights (with the nonzero biases that "
                                "`make onnx` gives a model without a checkpoint)")
                trained_like_(model_holder["m"])
        return model_holder["m"]

    runners: list[tuple[str, Runner]] = []
    skipped: list[dict] = []
    for spec in select_backends(args.backends, baseline_backends()):
        runner = resolve_backend(spec, out, args.model, model=get_model, threads=threads)
        if isinstance(runner, Skip):
            skipped.append({"backend": spec.name, "reason": runner.reason})
        else:
            runners.append((spec.name, runner))
    return runners, skipped


def _emulation(backend: str, precision: str) -> dict[str, str]:
    """``{"emulated": why}`` for a row that times an emulation (ONNX Runtime on the fp8 graph), else ``{}``."""
    return {"emulated": EMULATED[precision]} if (precision in EMULATED and
                                                 parse_backend(backend).runtime == "onnxruntime") else {}


def run_baselines(args: argparse.Namespace, out: Path, img_size: int, batches: Sequence[int],
                  threads: int) -> tuple[list[dict], list[dict]]:
    """Time every available baseline over ``batches``: (rows, skipped backends with reasons)."""
    from tqdm import tqdm

    runners, skipped = _baseline_runners(args, out, img_size, threads)
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, img_size, img_size, generator=gen) for b in batches}
    rows: list[dict] = []
    bar = tqdm(total=len(runners) * len(batches), desc="baselines", unit="run", disable=args.no_progress)
    for key, runner in runners:
        try:
            with runner:
                device = getattr(runner, "device", None) or getattr(runner, "provider", "cpu")
                for batch in batches:
                    bar.set_postfix_str(f"{runner.name} b{batch}")
                    secs = time_runner(runner, images[batch], args.min_time, args.min_iters, args.warmup)
                    stats = latency_stats(secs)
                    rows.append({"backend": runner.name, "precision": runner.precision, "device": str(device),
                                 "batch": batch, "source": "runner", "latency_ms": stats, "gpu_compute_ms": None,
                                 "images_per_s": batch / (stats["mean"] / 1e3), "iterations": len(secs),
                                 **_emulation(key, runner.precision)})
                    bar.update(1)
        except Exception as e:  # one failing baseline must not sink the others; the reason is reported
            _logger.warning("%s failed: %s", key, e)
            skipped.append({"backend": key, "reason": f"failed: {type(e).__name__}: {e}"})
    bar.close()
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
    lines = [
        f"# Inference benchmark: {report['model']} at {report['img_size']} px",
        "",
        f"Produced by `{report['command']}` on {report['created_utc']}.",
        "",
        f"- Host: {host_line(host)}",
        f"- TensorRT {trt.get('version') or 'not used'}",
        f"- Weights: {report.get('weights')}",
        f"- Baseline timing: {timing.get('warmup')} warmup call(s), then at least {timing.get('min_iters')} calls and "
        f"{timing.get('min_time_s')} s per batch; CPU threads: {timing.get('cpu_threads')}",
    ]
    for precision, g in (report.get("onnx_graphs") or {}).items():
        extra = ", ".join(f"{k} {g[k]}" for k in _GRAPH_KEYS if k in g and k != "precision")
        lines.append(f"- ONNX {precision}: `{g['path']}` ({g['size_mb']} MB; {extra})")
    load = report.get("load_average_during") or {}
    if load.get("before") is not None:
        lines.append(f"- Load average (1 min) before / after the run: {load['before']} / {load.get('after')}")
    lines += [
        "",
        "## TensorRT",
        "",
    ]
    if trt["ran"]:
        lines += [f"trtexec {trt['version']} on `{trt['engine']}` (built with TensorRT "
                  f"{trt['sidecar'].get('tensorrt_version')} on {trt['sidecar'].get('gpu', {}).get('name')}"
                  + (f"; it runs on compute capability {trt['sidecar']['requires_compute_capability']}+ only"
                     if trt["sidecar"].get("requires_compute_capability") else "") + "). Commands:", ""]
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
        lat = r["latency_ms"] or {}  # a trtexec summary may lack the Latency line
        gpu_ms = (r.get("gpu_compute_ms") or {}).get("median")
        precision = f"{r['precision']} (emulated)" if r.get("emulated") else r["precision"]
        lines.append(f"| {r['backend']} | {precision} | {r['device']} | {r['batch']} | {_fmt(lat.get('median'))} | "
                     f"{_fmt(lat.get('mean'))} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('p99'))} | {_fmt(gpu_ms)} | "
                     f"{_fmt(r['images_per_s'], 1)} | {_fmt(r.get('iterations'))} |")
    if not report["rows"]:
        lines.append("| (nothing ran) | | | | | | | | | | |")
    emulated = sorted({r["emulated"] for r in report["rows"] if r.get("emulated")})
    if emulated:
        lines += ["", "(emulated): " + "; ".join(emulated) + ". These rows time the emulation on this device, not "
                  "the precision's hardware speed (TensorRT rows are the real thing)."]
    if report["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {s['backend']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any]) -> Any:
    """The figure: median latency and images/s against batch, one line per backend."""
    plt = pyplot()

    series: dict[str, list[dict]] = {}
    for r in report["rows"]:
        series.setdefault(r["backend"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        lat = [(r["batch"], (r["latency_ms"] or r.get("gpu_compute_ms") or {}).get("median")) for r in rows]
        ax1.plot([b for b, v in lat if v is not None], [v for b, v in lat if v is not None], marker="o", label=name)
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
    return fig


def _resolve_img_size(args: argparse.Namespace, graphs: dict[str, Path]) -> int:
    if args.img_size:
        return int(args.img_size)
    for path in graphs.values():
        dims = next(iter(graph_inputs(path).values()))
        if isinstance(dims[-1], int):
            return int(dims[-1])
    import timm

    cfg = timm.models.get_pretrained_cfg(args.model)  # the model registry (t2t_vit imported above)
    return int(cfg.input_size[-1]) if cfg is not None else 224


_GRAPH_KEYS = ("precision", "checkpoint_sha256", "opset", "exporter", "patterns", "float_dtype", "calib_method",
               "calib_policy", "calib_size", "quantized_nodes")


def describe_graphs(graphs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Where each timed ONNX graph came from: path, size and the provenance keys of its metadata."""
    described = {}
    for precision, path in graphs.items():
        meta = read_metadata(path)
        described[precision] = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 1),
                                **{k: meta[k] for k in _GRAPH_KEYS if meta.get(k)}}
    return described


def run_bench(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Plan, time and write the report; returns it."""
    out = Path(args.out) if args.out else default_out(args.model)
    batches = sorted(set(args.batches))
    if not batches or any(b < 1 for b in batches):
        raise BenchError(f"--batches must be positive, got {args.batches} (BATCHES=1,8,32)")
    engine = Path(args.engine) if args.engine else out / f"{args.model}.{args.precision}.engine"
    # TensorRT first: with --tensorrt require this raises before anything is read or written.
    plan = plan_tensorrt(args.tensorrt, engine, args.trtexec, precision=args.precision)
    graphs = checked_graphs(args, out)
    img_size = _resolve_img_size(args, graphs)
    threads = apply_threads(args.threads)

    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    trt_rows, trt_runs = run_tensorrt(plan, batches, out, args) if plan.run else ([], [])
    base_rows, skipped = run_baselines(args, out, img_size, args.baseline_batches or batches, threads)
    load_after = load_average()
    report = {
        **report_header("engines.bench", argv),
        "kind": "bench-engines",
        "model": args.model,
        "img_size": img_size,
        "weights": args.checkpoint or "random, trained-like biases (no --checkpoint: t2t_vit.checkpoint.trained_like_)",
        "onnx_graphs": describe_graphs(graphs),
        # Other processes on the machine distort timings; the report says how busy it was.
        "load_average_during": {"before": load_before and load_before[0], "after": load_after and load_after[0]},
        "timing": {"min_time_s": args.min_time, "min_iters": args.min_iters, "warmup": args.warmup,
                   "cpu_threads": threads,
                   "trtexec": {"warmup_ms": args.warmup_ms, "duration_s": args.duration, "iterations": args.iterations}},
        "tensorrt": {"ran": plan.run, "reason": None if plan.run else plan.reason, "version": plan.version,
                     "trtexec": plan.trtexec, "engine": str(engine), "precision": args.precision,
                     "sidecar": plan.sidecar, "runs": trt_runs},
        "rows": trt_rows + base_rows,
        "skipped": skipped,
    }
    stem = report_stem(args.model, img_size, report["host"], args.precision if plan.run else None)
    md = render_markdown(report)
    with OutputLock(out):
        paths = write_report(out / stem, report, md, plot_report(report))
    if args.report:
        paths += write_report(_report_stem(args.report, stem), report, md, plot_report(report))
    report["written"] = [str(p) for p in paths]
    return report


def _report_stem(report: str, default_name: str) -> Path:
    """``--report``: a folder (existing, or written with a trailing /) gets the default file name."""
    p = Path(report)
    return p / default_name if report.endswith("/") or p.is_dir() else p


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="trtexec batch sweep of a TensorRT engine plus ONNX Runtime / "
                                            "PyTorch baselines, as JSON + Markdown + PNG", add_help=add_help)
    add_stage_args(p, checkpoint_help="weights for the PyTorch baselines (default: random; timing only)",
                   img_size_help="input size (default: the ONNX graph's, else the registry's)")
    add_run_args(p, batch_size=None, workers=None)
    g = p.add_argument_group("benchmark")
    g.add_argument("--precision", choices=ENGINE_PRECISIONS, default="fp16",
                   help="which engine to time: <out>/<model>.<precision>.engine (default fp16; fp8 runs on GPUs of "
                        "compute capability 8.9+)")
    g.add_argument("--engine", default=None, help="engine path instead of <out>/<model>.<precision>.engine")
    g.add_argument("--tensorrt", choices=("require", "auto", "off"), default="auto",
                   help="require: stop at once without trtexec/GPU/engine (make bench); auto: skip the TensorRT "
                        "part with the reason; off: baselines only (default auto)")
    g.add_argument("--trtexec", default=None, help="trtexec binary (default $TRTEXEC, then PATH)")
    g.add_argument("--batches", type=comma_list(int), default=list(DEFAULT_BATCHES),
                   help=f"batch sizes, comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})")
    g.add_argument("--baseline-batches", type=comma_list(int), default=None,
                   help="batch sizes for the baselines (default: --batches; CPUs may want fewer)")
    g.add_argument("--backends", default=None,
                   help="baselines to run, comma-separated runner names or prefixes (default: all available), "
                        "e.g. onnxruntime-cpu,pytorch-cpu-fp32; names: " + ", ".join(map(str, baseline_backends())))
    g.add_argument("--min-time", type=float, default=1.0, help="baselines: seconds of timed calls per batch (default 1)")
    g.add_argument("--min-iters", type=int, default=3, help="baselines: at least this many timed calls (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="baselines: untimed calls first (default 1)")
    g.add_argument("--warmup-ms", type=int, default=500, help="trtexec --warmUp in ms (default 500)")
    g.add_argument("--duration", type=float, default=10.0, help="trtexec --duration in s (default 10)")
    g.add_argument("--iterations", type=int, default=100, help="trtexec --iterations (default 100)")
    g.add_argument("--report", default=None,
                   help="also write the report here: a folder (reports/) or a file stem (reports/my-bench)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        try:
            report = run_bench(args, argv)
        except BenchError as e:
            raise BenchError(f"{e}\n(nothing was written)") from e
        for r in report["rows"]:
            median = (r["latency_ms"] or {}).get("median")
            print(f"{r['backend']:<28} b{r['batch']:<4} median {'-' if median is None else f'{median:9.2f}'} ms  "
                  f"{r['images_per_s'] or float('nan'):10.1f} images/s")
        if not report["tensorrt"]["ran"]:
            print(f"TensorRT part did not run: {report['tensorrt']['reason']}")
        print("wrote " + ", ".join(report["written"]))
        return 0

    return run_command(body, "engines.bench")


if __name__ == "__main__":
    raise SystemExit(main())
