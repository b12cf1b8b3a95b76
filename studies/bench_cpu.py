"""CPU inference speed against the authors' formulation, side by side in one run (``make bench-cpu``).

For each model (default t2t_vit_7 and t2t_vit_14 at 224 px) and batch (default 1 and 8), with the same
weights everywhere (random, with the nonzero biases and LayerNorm affines of a trained model:
:func:`t2t_vit.checkpoint.trained_like_`; a fresh init's zero biases would let onnxslim drop Adds from our graphs
that the unsimplified baseline still runs, and that no checkpoint's graph loses):

ONNX Runtime CPU (default graph optimizations):

* ``authors fp32``: a plain ``torch.onnx.export`` of the authors' formulation (:mod:`studies.authors`:
  Unfold, einsum), the baseline every ONNX Runtime row is divided by;
* ``ours fp32``: ``make onnx``'s fp32 graph (grouped one-hot soft splits, explicit attention, onnxslim);
* ``ours fp32, cls-only last block``: the same with the last block computed for the class token alone
  (``--cls-only-last-block``, ``T2TViT.set_cls_only_last_block``: the same logits, fewer multiply-adds);
* ``ours fp32, dense soft split``: the same with the dense one-hot Conv (``--soft-split conv``);
* ``ours fp32 + ORT transformer fusions``: that graph through ``onnxruntime.transformers.optimizer``
  (``model_type="vit"``), with the count of each fused operator;
* ``ours int8-cpu``: ``make calib TARGET=cpu``'s graph (the placement policy's Q/DQ over fp32, which ONNX
  Runtime fuses into ``MatMulIntegerToFloat``), calibrated on ``--calib-data`` (else noise: ranges only),
  from ``ours fp32`` and from its cls-only-last-block form;
* ``ours int8 (TensorRT graph)``: ``make calib``'s graph for TensorRT (fp16 outside the Q/DQ layers) on the
  CPU, for contrast.

PyTorch (eager unless stated): the authors' formulation (the baseline of the PyTorch rows), ours fp32,
ours with oneDNN Linear layers (also with the cls-only last block, and the authors' code with the same
kernel), ours fp32 under ``torch.compile`` (compile time reported), ours in bf16 autocast (AVX512-BF16
kernels).

The rows of one runtime and batch are timed side by side in interleaved rounds
(:func:`t2t_vit.timing.time_interleaved`), so a change of machine speed during the run (turbo, a neighbour
on the shared cores) reaches every row alike and the ratios stay fair.

Per ONNX Runtime graph: session start-up from the graph and from ONNX Runtime's saved optimized graph
(``optimized_model_filepath``, basic+extended optimizations, portable across CPUs of the same runtime
version), and a per-op profile (ONNX Runtime's profiler, the largest batch). Per row: median latency, images/s,
speed-up over the baseline, and the achieved GFLOP/s (GOP/s for int8) against the CPU's peak for the
instruction set (:func:`cpu_peak`, ``--ghz``). Around each model's rows, a machine check re-measures the GEMMs and
a memory copy, and a thread check (:func:`thread_gain`) times the CPU int8 graph at the smallest batch on one
thread and on all; the report flags a model whose GEMMs moved past 10% or whose extra threads bought less than
``THREAD_GAIN_MIN``. Writes ``<out>/bench-cpu.{json,md,png}``; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch

from calibration.data import load_or_preprocess, select_samples
from calibration.policy import DEFAULT_POLICY, Placement
from calibration.quantize import TensorDataReader, build_qdq, ensure_opset
from export.patterns import soft_split_as_conv
from export.to_onnx import ExportSettings, export_onnx
from t2t_vit.checkpoint import build_model, trained_like_
from t2t_vit.cli import apply_threads, comma_list, run_command
from t2t_vit.data import DataConfig
from t2t_vit.env import cpu_model
from t2t_vit.errors import T2TError
from t2t_vit.files import atomic_save_onnx
from t2t_vit.graphs import ort_session, ort_session_options
from t2t_vit.model import ARCHS
from t2t_vit.reports import host_line, markdown_table, pyplot, report_header, write_report
from t2t_vit.timing import load_average, time_calls, time_interleaved

from .authors import AuthorsModel
from .onednn import OneDNNLinear, onednn_linears

_logger = logging.getLogger(__name__)

__all__ = ["model_flops", "cpu_peak", "ort_profile", "get_args_parser", "main"]

CLS = "ours fp32, cls-only last block"
CLS_INT8 = "ours int8-cpu, cls-only last block"
ROUNDS = 5  # interleaved timing rounds per runtime and batch (t2t_vit.timing.time_interleaved)
MACHINE_DRIFT = 0.10  # a GEMM rate change around a model's rows past which its ratios are flagged
# The CPU int8 graph's batch-1 latency on 1 thread over that on all threads, below which a model's rows are
# flagged: the extra threads are not paying off for graphs of many short ops (docs/cpu-speed.md, "two speeds").
THREAD_GAIN_MIN = 1.3


# ----------------------------------------------------------------------------------------------------
# Work and the machine's limit
# ----------------------------------------------------------------------------------------------------
def model_flops(model: torch.nn.Module, img_size: int) -> float:
    """Floating-point operations of one image's forward pass (2 per multiply-add), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, img_size, img_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def _cpu_clock() -> tuple[float | None, str]:
    """The core clock in GHz and where it came from: cpufreq's maximum when the kernel exposes it, else
    /proc/cpuinfo's "cpu MHz" (in a VM usually the nominal clock; on bare metal the current one)."""
    try:
        khz = [int(p.read_text()) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq")]
        if khz:
            return max(khz) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        vals = [float(ln.split(":")[1]) for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("cpu MHz")]
        return (max(vals) / 1000.0, "/proc/cpuinfo cpu MHz") if vals else (None, "unknown")
    except (OSError, ValueError):
        return None, "unknown"


def physical_cores(threads: int) -> int:
    """How many physical cores ``threads`` threads can use: SMT siblings share one core's vector units."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        ids = {(Path(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id").read_text().strip(),
                Path(f"/sys/devices/system/cpu/cpu{c}/topology/core_id").read_text().strip()) for c in cpus}
        return max(1, min(threads, len(ids)))
    except (OSError, AttributeError):
        return threads


def cpu_peak(cores: int, ghz: float | None = None) -> dict[str, Any]:
    """Peak fp32 and bf16 FLOP/s and int8 OP/s of ``cores`` physical cores for this CPU's vector units.

    Per core and cycle: AVX-512 with two 512-bit FMA pipes (Zen 5 desktop/server, Xeon with two FMA units)
    64 fp32 FLOP and, with VNNI (vpdpbusd: 64 int8 multiply-adds per instruction), 256 int8 OP; Zen 4 runs
    512-bit FMAs as two 256-bit halves (32 FLOP, 128 OP); AVX2: 32 FLOP (two 256-bit FMAs), 128 OP with
    AVX-VNNI. AVX512-BF16 (vdpbf16ps) doubles the fp32 rate. Client chips with one 512-bit FMA unit have
    half the AVX-512 figures: pass ``--ghz`` and read the peak as an upper bound there.
    """
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    source = "--ghz"
    if not ghz:
        ghz, source = _cpu_clock()
    amd = "AMD" in cpu_model()
    if "avx512f" in flags and (not amd or "avx512_vp2intersect" in flags):
        isa, fp32, int8 = "AVX-512, 2 FMA pipes (Zen 5 / server Intel)", 64, 256 if "avx512_vnni" in flags else 128
    elif "avx512f" in flags:
        isa, fp32, int8 = "AVX-512 on 256-bit datapaths (Zen 4)", 32, 128
    elif "avx2" in flags:
        isa, fp32, int8 = "AVX2 + FMA", 32, 128 if "avx_vnni" in flags else 64
    else:
        isa, fp32, int8 = "unknown vector unit", 8, 16
    bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
    out = {"isa": isa, "cores": cores, "ghz": ghz, "clock_source": source, "fp32_flop_per_cycle_core": fp32,
           "bf16_flop_per_cycle_core": bf16, "int8_op_per_cycle_core": int8}
    out["fp32_gflops"] = cores * ghz * fp32 if ghz else None
    out["bf16_gflops"] = cores * ghz * bf16 if ghz else None
    out["int8_gops"] = cores * ghz * int8 if ghz else None
    return out


def gemm_ceiling(threads: int, work: Path, n: int = 2048, seconds: float = 2.0, torch_too: bool = True) -> dict[str, float]:
    """What this machine's GEMM kernels deliver in practice, n x n x n with ``threads`` threads: ONNX Runtime's
    fp32 MatMul and its int8 Q/DQ MatMul (fused to MatMulIntegerToFloat, the int8-cpu graph's kernel), and
    PyTorch's fp32 and bf16 ``torch.mm``. Model rows are held against the ceiling of their own runtime and type.

    In a VM the nominal clock that :func:`cpu_peak` reads can be below the clock the cores run at (turbo),
    so a row may pass the nominal peak; the measured ceilings do not depend on the clock being known.
    ``torch_too=False`` measures the ONNX Runtime kernels and the memory copy only (the quick machine check
    around each model)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    out: dict[str, float] = {}

    def rate(call, work: float = 2 * n ** 3) -> float:
        """``work`` (FLOP, OP or bytes) per call, in billions per second; the first call (page faults,
        kernel selection) is not timed."""
        times = time_calls(call, warmup=1, min_iters=3, min_time_s=seconds)
        return work * len(times) / sum(times) / 1e9

    inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    outp = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    fp32 = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "fp32_gemm", [inp], [outp],
                             [numpy_helper.from_array(b, "b")])
    scale = float(np.abs(a).max() / 127)
    int8 = helper.make_graph([
        helper.make_node("QuantizeLinear", ["a", "sa", "z"], ["qa"]),
        helper.make_node("DequantizeLinear", ["qa", "sa", "z"], ["da"]),
        helper.make_node("DequantizeLinear", ["qb", "sb", "z"], ["db"]),
        helper.make_node("MatMul", ["da", "db"], ["c"])], "int8_gemm", [inp], [outp],
        [numpy_helper.from_array(np.clip(np.round(b / 0.05), -127, 127).astype(np.int8), "qb"),
         numpy_helper.from_array(np.array(scale, np.float32), "sa"),
         numpy_helper.from_array(np.array(0.05, np.float32), "sb"),
         numpy_helper.from_array(np.array(0, np.int8), "z")])
    for key, graph in (("ort_fp32_gflops", fp32), ("ort_int8_gops", int8)):
        path = work / f"{graph.name}.onnx"
        atomic_save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
        sess = ort_session(path, threads=threads)
        out[key] = rate(lambda: sess.run(None, {"a": a}))
    # Memory bandwidth (a 256 MiB copy, bytes read + written): other tenants of the host show here first; the
    # GEMMs above run from cache and barely notice them, while a model's LayerNorms and transposes do.
    src = np.ones(2 ** 26, np.float32)
    dst = np.empty_like(src)
    out["copy_gbs"] = rate(lambda: np.copyto(dst, src), 2 * src.nbytes)
    if not torch_too:
        return out
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for key, dtype in (("torch_fp32_gflops", torch.float32), ("torch_bf16_gflops", torch.bfloat16)):
            ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
            out[key] = rate(lambda: torch.mm(ta, tb))
        if torch.backends.mkldnn.is_available():
            linear = OneDNNLinear(torch.nn.Linear(n, n))
            ta = torch.from_numpy(a)
            with torch.inference_mode():
                out["torch_onednn_fp32_gflops"] = rate(lambda: linear(ta))
    finally:
        torch.set_num_threads(before)
    return out


def row_peak(variant: str, peak: dict[str, Any]) -> float | None:
    """The peak a row's work is held against: int8 OP/s for the CPU int8 graph (most of its multiply-adds
    are the quantized MatMuls; its fp32 rest makes the fraction an underestimate), bf16 FLOP/s for bf16
    autocast, fp32 FLOP/s for fp32; none for the TensorRT int8 graph (int8, fp16 and fp32 mixed, the fp16
    through Casts on a CPU)."""
    if "TensorRT graph" in variant:
        return None
    if "int8" in variant:
        return peak["int8_gops"]
    if "bf16" in variant:
        return peak["bf16_gflops"]
    return peak["fp32_gflops"]


# ----------------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------------
def authors_onnx(model: torch.nn.Module, name: str, path: Path) -> Path:
    """A plain ``torch.onnx.export`` of the authors' formulation: the exporter's defaults (torch 2.14: the
    dynamo exporter with its own optimization pass), no project patterns, no onnxslim."""
    ref = AuthorsModel(model.state_dict(), ARCHS[name]["num_heads"], ARCHS[name]["tokens_type"]).eval()
    x = torch.randn(2, 3, model.img_size, model.img_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, external_data=False)
    return path


def int8_graphs(fp32_path: Path, work: Path, calib_images: np.ndarray,
                fp16_path: Path | None = None) -> dict[str, Path]:
    """The CPU (and, given the export's ``fp16_path``, the TensorRT) int8 graph of an fp32 graph, as ``make calib
    TARGET=cpu`` (and ``make calib``) write them (:func:`calibration.quantize.build_qdq`: default policy, here
    max calibration, both targets from one calibration; checked, with metadata), written beside it."""
    fp32 = ensure_opset(onnx.load(str(fp32_path)))
    placement = Placement.from_model(fp32, DEFAULT_POLICY)
    reader = TensorDataReader(calib_images, fp32.graph.input[0].name)
    paths = {"int8-cpu": work / f"{fp32_path.stem}.int8-cpu.onnx"}
    if fp16_path is not None:
        paths["int8"] = work / f"{fp32_path.stem}.int8-tensorrt.onnx"
    meta = {"calib_policy": DEFAULT_POLICY, "calib_size": str(len(calib_images))}
    with tempfile.TemporaryDirectory(prefix="t2t-bench-cpu-") as tmp:
        cache = Path(tmp) / "ranges-max.json"
        for key, target in (("int8-cpu", "cpu"), ("int8", "tensorrt")):
            if key in paths:
                build_qdq(fp32, placement, "max", reader, paths[key], target=target, cache=cache, meta=meta,
                           fp16_model=onnx.load(str(fp16_path)) if target == "tensorrt" else None)
    return paths


def transformer_fused(fp32_path: Path, name: str, path: Path) -> tuple[Path, dict[str, int]]:
    """ONNX Runtime's transformer optimizer (``model_type="vit"``) over our fp32 graph: the graph it writes and
    how many of each fused operator it made (its Attention fusion is expected to find none: docs/export.md)."""
    from onnxruntime.transformers import optimizer

    arch = ARCHS[name]
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fused = optimizer.optimize_model(str(fp32_path), model_type="vit", num_heads=arch["num_heads"],
                                             hidden_size=arch["embed_dim"], opt_level=0)
    finally:
        quiet.setLevel(level)
    atomic_save_onnx(fused.model, path)
    return path, {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}


def ort_profile(path: Path, x: np.ndarray, threads: int, runs: int = 5, top: int = 6) -> list[dict[str, Any]]:
    """ONNX Runtime's profiler over ``runs`` inferences after one warm-up run (its events are dropped):
    the op types taking the most kernel time, with shares."""
    with tempfile.TemporaryDirectory(prefix="t2t-prof-") as tmp:
        sess = ort_session(path, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        name = sess.get_inputs()[0].name
        for _ in range(runs + 1):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e.get("ts", 0))
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else -1
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e.get("ts", 0) > warm_end:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0.0))
    total = sum(per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    return [{"op": op, "share": 100.0 * us / total, "ms_per_run": us / 1000.0 / runs} for op, us in rows[:top]]


def _startup(path: Path, threads: int, x: np.ndarray, min_time: float, min_iters: int) -> dict[str, float]:
    """Session creation from the graph (all optimizations, as every project session), and from ONNX Runtime's
    saved optimized graph (written at the same level, loaded with optimizations off: the work is done), with
    the latency of the reloaded session on ``x`` to show it runs the same graph as fast."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    ort_session(path, threads=threads)
    plain = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="t2t-opt-") as tmp:
        saved = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), sess_options=ort_session_options(threads, optimized_model=saved),
                             providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        sess = ort_session(saved, threads=threads, optimize=False)
        reloaded = time.perf_counter() - t0
        name = sess.get_inputs()[0].name
        ms = 1e3 * _time(lambda: sess.run(None, {name: x}), min_time, min_iters)
    return {"session_s": plain, "session_from_saved_optimized_s": reloaded, "saved_optimized_ms_max_batch": ms}


def _time(fn: Callable[[], Any], min_time: float, min_iters: int) -> float:
    return statistics.median(time_calls(fn, warmup=2, min_iters=min_iters, min_time_s=min_time))


def thread_gain(path: Path, threads: int, x: np.ndarray, min_time: float) -> float | None:
    """Latency of ``path`` on one thread over its latency on ``threads`` threads, the two sessions timed side by
    side in interleaved rounds; None with one thread. Unlike a large GEMM, which keeps every thread busy, a graph
    of many short ops wakes the other threads for each op, so this is where a host that is slow to wake them
    shows."""
    if threads <= 1:
        return None
    one, many = ort_session(path, threads=1), ort_session(path, threads=threads)
    name = one.get_inputs()[0].name
    secs = _time_all({"one": lambda: one.run(None, {name: x}), "many": lambda: many.run(None, {name: x})},
                     min_time, 3)
    return secs["one"] / secs["many"]


def _time_all(fns: dict[str, Callable[[], Any]], min_time: float, min_iters: int) -> dict[str, float]:
    """Median seconds per call of each function, timed side by side in interleaved rounds (``min_time`` and
    ``min_iters`` per function over all rounds)."""
    times = time_interleaved(fns, rounds=ROUNDS, warmup=2, min_iters=min_iters, min_time_s=min_time)
    return {label: statistics.median(t) for label, t in times.items()}


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def _rate(rows: list[dict[str, Any]], flops: float, peak: dict[str, Any]) -> None:
    """Each row's speed-up over the authors' row of its runtime and batch, and its GFLOP/s against the peak."""
    for r in rows:
        base = next(x for x in rows if x["runtime"] == r["runtime"] and x["batch"] == r["batch"]
                    and x["variant"].startswith("authors"))
        r["speedup_vs_authors"] = r["images_per_s"] / base["images_per_s"]
        achieved = flops * r["images_per_s"] / 1e9
        r["achieved_gflops"] = achieved
        peak_val = row_peak(r["variant"], peak)
        r["peak_fraction"] = achieved / peak_val if peak_val else None


def _bench_graphs(model: torch.nn.Module, name: str, work: Path,
                  calib_images: np.ndarray | None) -> tuple[dict[str, Path], Any]:
    """Every graph the CPU benchmark times (the authors' export, ours in each form, our int8 graphs, calibrated
    on ``calib_images``, or 16 Gaussian images), written to ``work``; and the ORT transformer fusions the fused
    row got."""
    if calib_images is None:
        size = model.img_size
        calib_images = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
    graphs = {"authors fp32": authors_onnx(model, name, work / "authors-fp32.onnx"),
              "ours fp32": export_onnx(model, work / "fp32.onnx", "fp32"),
              CLS: export_onnx(model, work / "fp32-cls.onnx", "fp32",
                               settings=ExportSettings(cls_only_last_block=True)),
              "ours fp32, dense soft split": export_onnx(model, work / "fp32-dense.onnx", "fp32",
                                                         settings=ExportSettings(soft_split="conv"))}
    graphs["ours fp32 + ORT transformer fusions"], fusions = transformer_fused(graphs["ours fp32"], name,
                                                                               work / "fp32-ort-fused.onnx")
    q = int8_graphs(graphs["ours fp32"], work, calib_images, export_onnx(model, work / "fp16.onnx", "fp16"))
    graphs["ours int8-cpu"] = q["int8-cpu"]
    graphs[CLS_INT8] = int8_graphs(graphs[CLS], work, calib_images)["int8-cpu"]
    graphs["ours int8 (TensorRT graph)"] = q["int8"]
    return graphs, fusions


def bench_model(name: str, args: argparse.Namespace, threads: int, peak: dict[str, Any], work: Path,
                calib_images: np.ndarray | None, check: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(0)
    model = trained_like_(build_model(name, img_size=args.img_size).eval())
    size = model.img_size
    work.mkdir(parents=True, exist_ok=True)
    flops = model_flops(model, size)
    # The soft splits' multiply-adds as each exported form computes them (Unfold itself is a copy: none).
    soft_split = {form: (model_flops(soft_split_as_conv(copy.deepcopy(model), form), size) - flops) / 1e9
                  for form in ("grouped", "conv")}
    model.set_cls_only_last_block(True)
    cls_only = model_flops(model, size) / 1e9
    model.set_cls_only_last_block(False)
    graphs, fusions = _bench_graphs(model, name, work, calib_images)
    rows: list[dict[str, Any]] = []
    xs = {b: np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32) for b in args.batches}
    onednn = torch.backends.mkldnn.is_available()  # PyTorch builds without oneDNN skip its three rows
    per_batch = 3 + (1 if args.compile else 0) + (3 if onednn else 0)
    bar = tqdm(total=len(graphs) * len(args.batches) + per_batch * len(args.batches), desc=name, unit="run",
               disable=args.no_progress)
    machine = {"before": check()} if check else {}
    sessions, extra = {}, {}
    for label, path in graphs.items():
        extra[label] = {"file_mib": path.stat().st_size / 2**20,
                        **_startup(path, threads, xs[max(args.batches)], args.min_time, args.min_iters),
                        "profile": ort_profile(path, xs[max(args.batches)], threads)}
        sessions[label] = ort_session(path, threads=threads)
    probe = lambda: thread_gain(graphs[CLS_INT8], threads, xs[min(args.batches)], min(args.min_time, 2.0))  # noqa: E731
    machine["thread_gain"] = [probe()]
    # Every graph of a batch in interleaved rounds: machine drift lands on all of them alike.
    seconds: dict[tuple[str, int], float] = {}
    for b in args.batches:
        fns = {label: (lambda s=sess, n=sess.get_inputs()[0].name, x=xs[b]: s.run(None, {n: x}))
               for label, sess in sessions.items()}
        for label, times in _time_all(fns, args.min_time, args.min_iters).items():
            seconds[label, b] = times
        bar.update(len(fns))
    for label in graphs:
        for b in args.batches:
            sec = seconds[label, b]
            rows.append({"runtime": "onnxruntime", "variant": label, "batch": b, "median_ms": 1e3 * sec,
                         "images_per_s": b / sec, **extra[label]})
    del sessions
    ref = AuthorsModel(model.state_dict(), ARCHS[name]["num_heads"], ARCHS[name]["tokens_type"]).eval()
    if onednn:
        fast = onednn_linears(model)
        fast_cls = onednn_linears(model)
        fast_cls.set_cls_only_last_block(True)
        ref_fast = AuthorsModel(model.state_dict(), ARCHS[name]["num_heads"], ARCHS[name]["tokens_type"]).eval()
        ref_fast.with_linear_kernel(lambda w, b: OneDNNLinear(weight=w, bias=b))
    with torch.inference_mode():
        for b in args.batches:
            x = torch.from_numpy(xs[b])
            variants: list[tuple[str, Callable[[], Any], float | None]] = [
                ("authors fp32 eager", lambda: ref(x), None), ("ours fp32 eager", lambda: model(x), None)]
            if onednn:
                # The same kernel swap on the authors' model: how much of the gain is the kernel library.
                variants += [("ours fp32 eager, oneDNN Linear", lambda: fast(x), None),
                             ("ours fp32 eager, oneDNN Linear, cls-only last block", lambda: fast_cls(x), None),
                             ("authors fp32 eager, oneDNN Linear", lambda: ref_fast(x), None)]
            if args.compile:
                t0 = time.perf_counter()
                compiled = torch.compile(model, dynamic=False)
                compiled(x)
                variants.append(("ours fp32 torch.compile", lambda: compiled(x), time.perf_counter() - t0))

            def bf16() -> Any:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)

            variants.append(("ours bf16 autocast eager", bf16, None))
            secs = _time_all({label: fn for label, fn, _ in variants}, args.min_time, args.min_iters)
            for label, fn, compile_s in variants:
                rows.append({"runtime": "pytorch", "variant": label, "batch": b, "median_ms": 1e3 * secs[label],
                             "images_per_s": b / secs[label], "compile_s": compile_s})
            bar.update(len(variants))
    bar.close()
    machine["thread_gain"].append(probe())
    gains = [g for g in machine["thread_gain"] if g is not None]
    machine["threads_not_paying"] = bool(gains) and min(gains) < THREAD_GAIN_MIN
    if check:
        machine["after"] = check()
        machine["changed"] = max(abs(machine["after"][k] / machine["before"][k] - 1) for k in machine["before"])
    _rate(rows, flops, peak)
    return {"model": name, "img_size": size, "gflop_per_image": flops / 1e9, "rows": rows,
            "soft_split_gflop_per_image": soft_split, "cls_only_gflop_per_image": cls_only, "machine_check": machine,
            "transformer_fusions": fusions, "graphs": {k: str(v) for k, v in graphs.items()}}


def render_markdown(report: dict[str, Any]) -> str:
    peak = report["peak"]
    lines = ["# CPU inference: ONNX Runtime and PyTorch against the authors' formulation", "",
             f"`{report['command']}`", "",
             f"Host: {host_line(report['host'])}; load average at the end {report['load_average_end']}. "
             f"{report['threads']} threads. Peak for {peak['cores']} physical cores at {peak['ghz'] or '?'} GHz "
             f"({peak.get('clock_source', '?')}; {peak['isa']}): {peak['fp32_gflops'] or float('nan'):.0f} fp32 and "
             f"{peak.get('bf16_gflops') or float('nan'):.0f} bf16 GFLOP/s, {peak['int8_gops'] or float('nan'):.0f} "
             f"int8 GOP/s. \"of peak\" holds the model's multiply-adds (x2) per second against the peak of the "
             f"row's type: int8 for int8-cpu (whose LayerNorms, Softmax and Performer core still run in fp32, so "
             f"the fraction understates the int8 kernels), none for the TensorRT int8 graph (mixed types, its fp16 "
             f"through Casts on a CPU). The same weights everywhere (random, with trained-like nonzero biases and "
             f"LayerNorm affines); latency is the median of at least "
             f"{report['min_iters']} runs and {report['min_time_s']} s, the rows of one runtime and batch timed in "
             f"{ROUNDS} interleaved rounds (each round visits every row, in a rotated order), so a change of machine speed "
             f"during the run slows every row alike instead of the one running at the time.", ""]
    gemm = peak.get("gemm_measured")
    if gemm:
        lines[-2] += (f" Measured in the same run, a 2048 x 2048 x 2048 GEMM with {report['threads']} threads reaches "
                      f"{gemm['ort_fp32_gflops']:.0f} fp32 GFLOP/s and {gemm['ort_int8_gops']:.0f} int8 GOP/s "
                      f"(MatMulIntegerToFloat) in ONNX Runtime, {gemm['torch_fp32_gflops']:.0f} fp32 and "
                      f"{gemm['torch_bf16_gflops']:.0f} bf16 GFLOP/s in PyTorch (`torch.mm`), "
                      f"{gemm.get('torch_onednn_fp32_gflops') or float('nan'):.0f} fp32 GFLOP/s through oneDNN "
                      f"(`studies.onednn.OneDNNLinear`): the ceilings a model "
                      f"row can approach. Where a ceiling or a row passes the nominal peak, the cores ran above the "
                      f"nominal clock (turbo), which this machine does not report. A 256 MiB copy moves "
                      f"{gemm.get('copy_gbs') or float('nan'):.1f} GB/s (read + write).")
    for m in report["models"]:
        ss = m.get("soft_split_gflop_per_image", {})
        lines += [f"## {m['model']} ({m['img_size']} px, {m['gflop_per_image']:.2f} GFLOP per image)", "",
                  f"The soft splits as one-hot Convs add {ss.get('grouped', 0):.3f} GFLOP per image in the grouped "
                  f"form and {ss.get('conv', 0):.3f} in the dense form (all but the grouped form's share multiply "
                  f"by zero). With the last block for the class token only (the cls-only rows) the model does "
                  f"{m.get('cls_only_gflop_per_image') or float('nan'):.2f} GFLOP per image. GFLOP/s below count "
                  f"the whole model's {m['gflop_per_image']:.2f} for every row (work-equivalent rates).", ""]
        table = [[r["runtime"], r["variant"], r["batch"], r["median_ms"], r["images_per_s"],
                  f"{r['speedup_vs_authors']:.2f}x", r["achieved_gflops"],
                  f"{100 * r['peak_fraction']:.1f}%" if r.get("peak_fraction") else "-",
                  r.get("compile_s")] for r in m["rows"]]
        lines += [markdown_table(["runtime", "variant", "batch", "median ms", "images/s", "vs authors",
                                  "GFLOP/s (GOP/s int8)", "of peak", "compile s"], table), ""]
        mc = m.get("machine_check") or {}
        if mc.get("after"):
            b, a = mc["before"], mc["after"]
            lines += [f"Machine check, ONNX Runtime's 2048^3 GEMMs and a 256 MiB copy just before these rows and "
                      f"just after them: fp32 "
                      f"{b['ort_fp32_gflops']:.0f} -> {a['ort_fp32_gflops']:.0f} GFLOP/s, int8 {b['ort_int8_gops']:.0f} "
                      f"-> {a['ort_int8_gops']:.0f} GOP/s, memory copy {b['copy_gbs']:.1f} -> {a['copy_gbs']:.1f} GB/s"
                      + (f". **The machine's speed changed by {100 * mc['changed']:.0f}% during these rows** (another "
                         f"tenant of the host, or the clock): their ratios are less certain than usual."
                         if mc["changed"] > MACHINE_DRIFT else f" (within {100 * MACHINE_DRIFT:.0f}%)."), ""]
        gains = [g for g in mc.get("thread_gain") or [] if g is not None]
        if gains:  # flagged by bench_model (threads_not_paying), the one place that judges the gains
            lines += [f"Thread check, the CPU int8 graph (cls-only last block) at batch {min(r['batch'] for r in m['rows'])}"
                      f": one thread's latency over {report['threads']} threads' before the ONNX Runtime rows and after "
                      f"the PyTorch rows: " + " -> ".join(f"{g:.2f}x" for g in gains)
                      + (f". **Below {THREAD_GAIN_MIN}x: the extra threads were not paying off for graphs of many short "
                         f"ops** (a host slow to wake them; on the development VM, its slow state: docs/cpu-speed.md): "
                         f"this model's int8 and batch-1 rows understate what its graphs do; run again." if mc.get("threads_not_paying")
                         else f" (at least {THREAD_GAIN_MIN}x)."), ""]
        big = max(r["batch"] for r in m["rows"])
        starts = [[r["variant"], r["session_s"], r["session_from_saved_optimized_s"], r["saved_optimized_ms_max_batch"],
                   r["median_ms"]] for r in m["rows"] if r["runtime"] == "onnxruntime" and r["batch"] == big]
        lines += ["ONNX Runtime session start-up: from the graph (all optimizations) and from the optimized graph "
                  "ONNX Runtime saved (optimizations off when loading it), with the saved graph's latency:", "",
                  markdown_table(["graph", "session s", "session s (saved optimized)",
                                  f"saved optimized ms (batch {big})", f"ms (batch {big})"], starts), ""]
        seen = set()
        lines += ["ONNX Runtime per-op profile (batch " f"{max(r['batch'] for r in m['rows'])}, share of kernel time):", ""]
        for r in m["rows"]:
            if r["runtime"] == "onnxruntime" and r["variant"] not in seen:
                seen.add(r["variant"])
                lines.append(f"- {r['variant']}: " + ", ".join(f"{p['op']} {p['share']:.0f}%" for p in r["profile"]))
        fused = m.get("transformer_fusions") or {}
        lines += ["", "ONNX Runtime transformer optimizer (`model_type=vit`) on ours fp32: "
                  + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "nothing fused")
                  + f"; Attention fusions: {fused.get('Attention', 0) + fused.get('MultiHeadAttention', 0)}.", ""]
    if report.get("goals"):
        load = (report.get("host") or {}).get("load_average") or [0.0]
        busy = f" The machine was not idle (load average {load[0]} at the start): speed-ups are less certain." \
            if load and load[0] > 0.5 else ""
        if any((m.get("machine_check") or {}).get("threads_not_paying") for m in report["models"]):
            busy += " The thread check flagged a model (see its section): its goals are judged on understated rows."
        lines += ["## Goals", "", "Judged at 224 px, batches 1 and 8, against the authors' code in the same run." + busy,
                  "", markdown_table(["goal", "measured", "met", "it needs (worst batch)"],
                                     [[g["goal"], g["measured"], "yes" if g["met"] else "**no**", g.get("needs", "-")]
                                      for g in report["goals"]]), "",
                  "\"It needs\": the model's work per second at the goal's factor times the authors' fastest batch, "
                  "against the GEMM ceiling measured in this run for that runtime and type (a whole model also runs "
                  "LayerNorms, Softmax, transposes and the small T2T stage, so it stays below its GEMM ceiling; "
                  "int8-cpu runs those in fp32).", ""]
    elif report.get("goals_note"):
        lines += ["## Goals", "", report["goals_note"], ""]
    lines += ["![images/s](bench-cpu.png)", ""]
    return "\n".join(lines)


GOALS_DOC = Path(__file__).resolve().parents[1] / "docs" / "cpu-speed.md"
GOAL_KEYS = ("onnxruntime-fp32", "int8-cpu", "pytorch-fp32")


def read_goals(path: Path = GOALS_DOC) -> dict[str, dict[str, float]]:
    """The goals' factors, ``{model: {goal key: factor}}``, from the table under ``## Goals`` in
    docs/cpu-speed.md: the targets are set (and changed) in the docs, never here."""
    text = path.read_text() if path.is_file() else ""
    section = text.split("\n## Goals\n", 1)[1].split("\n## ", 1)[0] if "\n## Goals\n" in text else ""
    table = [[c.strip().strip("`") for c in ln.strip().strip("|").split("|")]
             for ln in section.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    if len(table) < 2 or table[0][0] != "goal" or {r[0] for r in table[1:]} != set(GOAL_KEYS):
        raise T2TError(f"{path} has no goals table (## Goals: a row per goal {', '.join(GOAL_KEYS)}, a column per "
                       f"model, each cell the speed-up factor); restore it from git")
    try:
        return {model: {r[0]: float(r[i]) for r in table[1:]} for i, model in enumerate(table[0][1:], 1)}
    except (ValueError, IndexError) as e:
        raise T2TError(f"{path}: a goals table cell is not a number ({e}); write factors like 1.3") from None


def _goals(report: dict[str, Any], targets: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """The targets of the CPU speed work (:func:`read_goals`), checked against this run, each with what meeting
    it would take: the GFLOP/s (GOP/s) the model's work needs at the required speed-up, against the GEMM ceiling
    measured in the same run for that runtime and type, so an unmet goal shows how close it is to physical reach.
    The PyTorch goal also states the ratio at equal kernels (ours and the authors' code both with oneDNN Linear)."""
    targets = read_goals() if targets is None else targets
    out = []
    peak = report["peak"]
    gemm = peak.get("gemm_measured") or {}

    def rows(model, runtime, variant):
        m = next((x for x in report["models"] if x["model"] == model), None)
        return [r for r in (m["rows"] if m else []) if r["runtime"] == runtime and r["variant"] == variant]

    def goal(text, ours, need, baseline, ceiling, unit):
        best: dict[int, float] = {}
        for r in ours:
            best[r["batch"]] = max(best.get(r["batch"], 0.0), r["speedup_vs_authors"])
        required = max(need * r["achieved_gflops"] for r in baseline) if baseline else None
        reach = (f"{required:.0f} {unit} ({100 * required / ceiling:.0f}% of the {unit} ceiling {ceiling:.0f})"
                 if required and ceiling else "-")
        out.append({"goal": text, "measured": ", ".join(f"b{b} {v:.2f}x" for b, v in sorted(best.items())),
                    "met": min(best.values()) >= need, "needs": reach,
                    "within_ceiling": bool(required and ceiling and required <= ceiling)})

    for model, need in targets.items():
        ort_base, pt_base = rows(model, "onnxruntime", "authors fp32"), rows(model, "pytorch", "authors fp32 eager")
        fp32 = rows(model, "onnxruntime", "ours fp32") + rows(model, "onnxruntime", CLS)
        if fp32:
            goal(f"{model}: ONNX Runtime fp32 >= {need['onnxruntime-fp32']}x the authors' export at every batch "
                 f"(ours fp32, or cls-only last block)", fp32, need["onnxruntime-fp32"], ort_base,
                 gemm.get("ort_fp32_gflops"), "GFLOP/s")
        int8 = rows(model, "onnxruntime", "ours int8-cpu") + rows(model, "onnxruntime", CLS_INT8)
        if int8:
            goal(f"{model}: int8-cpu >= {need['int8-cpu']}x the authors' fp32 export (either int8-cpu graph)", int8,
                 need["int8-cpu"], ort_base, gemm.get("ort_int8_gops"), "GOP/s")
        pt = [r for v in ("ours fp32 eager", "ours fp32 eager, oneDNN Linear",
                          "ours fp32 eager, oneDNN Linear, cls-only last block", "ours fp32 torch.compile")
              for r in rows(model, "pytorch", v)]
        if pt:
            ceiling = max(gemm.get("torch_fp32_gflops") or 0, gemm.get("torch_onednn_fp32_gflops") or 0) or None
            goal(f"{model}: PyTorch fp32 (eager, oneDNN Linear or compile) >= {need['pytorch-fp32']}x the authors' "
                 f"model", pt, need["pytorch-fp32"], pt_base, ceiling, "GFLOP/s")
            same = {r["batch"]: r for r in rows(model, "pytorch", "authors fp32 eager, oneDNN Linear")}
            ours_same = [r for r in rows(model, "pytorch", "ours fp32 eager, oneDNN Linear") if r["batch"] in same]
            if ours_same:
                equal = {r["batch"]: r["images_per_s"] / same[r["batch"]]["images_per_s"] for r in ours_same}
                out[-1]["equal_kernels"] = equal
                out[-1]["measured"] += " (equal kernels, both with oneDNN Linear: " + ", ".join(
                    f"b{b} {v:.2f}x" for b, v in sorted(equal.items())) + ")"
    return out


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()

    models = report["models"]
    batch = max(report["batches"])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in m["rows"] if r["batch"] == batch]
        labels = [f"{r['runtime']}: {r['variant']}" for r in rows]
        y = np.arange(len(rows))
        ax.barh(y, [r["images_per_s"] for r in rows],
                color=["#8c8c8c" if r["variant"].startswith("authors") else "#4c72b0" for r in rows])
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            ax.text(r["images_per_s"], i, f" {r['speedup_vs_authors']:.2f}x", va="center", fontsize=8)
        ax.set_xlabel(f"images/s at batch {batch}")
        ax.set_title(f"{m['model']} ({m['img_size']} px)")
        ax.set_xlim(0, max(r["images_per_s"] for r in rows) * 1.25)
    fig.tight_layout()
    return fig


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CPU inference speed of the exported and int8 graphs and of PyTorch, "
                                            "against the authors' formulation", add_help=add_help)
    p.add_argument("--models", type=comma_list(str), default=["t2t_vit_7", "t2t_vit_14"],
                   help="models, comma-separated (default t2t_vit_7,t2t_vit_14)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=comma_list(int), default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--calib-data", default=None,
                   help="ImageFolder for the int8 ranges (default: noise; ranges do not change the speed)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed runs per point (default 3)")
    p.add_argument("--min-iters", type=int, default=5, help="at least this many timed runs per point (default 5)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--threads", default="auto", help="threads for ONNX Runtime and PyTorch (default auto)")
    p.add_argument("--ghz", type=float, default=None,
                   help="core clock for the peak (default cpufreq's maximum, else /proc/cpuinfo's: in a VM the "
                        "nominal clock, so the peak is a lower bound of the boosted one)")
    p.add_argument("--work", default="artifacts/bench-cpu", help="folder for the benchmarked graphs")
    p.add_argument("--out", default="reports")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        if not args.models or not args.batches or min(args.batches) < 1:
            raise T2TError(f"--models and --batches need at least one entry, batches >= 1 (got {args.models}, "
                           f"{args.batches})")
        unknown = [m for m in args.models if m not in ARCHS]
        if unknown:
            raise T2TError(f"unknown models {unknown}; registered: {', '.join(ARCHS)}")
        threads = apply_threads(args.threads)
        header = report_header("studies.bench_cpu", argv)
        peak = cpu_peak(physical_cores(threads), args.ghz)
        peak["gemm_measured"] = gemm_ceiling(threads, Path(args.work) / "gemm")
        models = []
        for name in args.models:
            calib = None
            if args.calib_data:
                m = build_model(name, img_size=args.img_size)
                cfg = DataConfig.from_model(m)
                calib = load_or_preprocess(select_samples(args.calib_data, args.calib_images, what="--calib-images"),
                                           cfg, Path(args.work) / "calib", progress=False).images.numpy()
            models.append(bench_model(name, args, threads, peak, Path(args.work) / f"{name}-{args.img_size}", calib,
                                      check=lambda: gemm_ceiling(threads, Path(args.work) / "gemm", seconds=1.0,
                                                                 torch_too=False)))
        report = {**header, "threads": threads, "peak": peak, "batches": list(args.batches),
                  "min_time_s": args.min_time, "min_iters": args.min_iters, "models": models,
                  "load_average_end": load_average()}
        if args.img_size == 224 and {1, 8} <= set(args.batches):
            report["goals"] = _goals(report)
        else:
            report["goals"] = []
            report["goals_note"] = "not judged: the goals are set at 224 px for batches 1 and 8 (this run: " \
                                   f"{args.img_size} px, batches {list(args.batches)})"
        md = render_markdown(report)
        write_report(Path(args.out) / "bench-cpu", report, md, plot(report))
        print(md)
        return 0

    return run_command(body, "studies.bench_cpu")


if __name__ == "__main__":
    sys.exit(main())
