"""ONNX Runtime CPU throughput of the fp32, fp16 and int8 graphs, several models and batch sizes, one run.

``make bench-calib`` ::

    python -m studies calib --models t2t_vit_7,t2t_vit_14 --img-size 224 --batch-sizes 1,8 --out reports

For each model the fp32/fp16 graphs are exported (``export.to_onnx.export_model``, random weights with
a trained model's nonzero biases and LayerNorm affines, :func:`t2t_vit.checkpoint.trained_like_`) into
``--work``, and the int8 graph is built by ``make calib``'s own function
(:func:`calibration.quantize.build_qdq`: default policy, entropy calibration on ``--calib-images`` images:
real ones from ``--calib-data`` when given, else Gaussian noise, which only sets ranges; checked, with its
metadata). Also timed: ``int8-fp32``, ``make calib TARGET=cpu``'s graph from the same ranges (the same Q/DQ
placement over fp32), which is the form ONNX Runtime's CPU provider can fuse into its int8 (VNNI) kernels;
the deployed ``int8`` graph keeps fp16 elsewhere for TensorRT, and the CPU provider runs fp16 ops by
inserting casts to fp32 around them.
Writes ``<out>/bench-calib-cpu.{json,md}`` with the hardware named.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.settings import METADATA_KEY
from export.to_onnx import export_model
from t2t_vit.checkpoint import build_model, trained_like_
from t2t_vit.cli import apply_threads, comma_list, run_command
from t2t_vit.data import DataConfig
from t2t_vit.graphs import ort_session, read_metadata
from t2t_vit.reports import host_line, markdown_table, report_header, write_report
from t2t_vit.timing import load_average, time_calls

from calibration.data import load_or_preprocess, select_samples
from calibration.policy import DEFAULT_POLICY, Placement
from calibration.quantize import TensorDataReader, build_qdq, ensure_opset

__all__ = ["get_args_parser", "time_session", "run", "main"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ONNX Runtime CPU throughput of fp32/fp16/int8 graphs", add_help=add_help)
    p.add_argument("--models", type=comma_list(str), default=["t2t_vit_7", "t2t_vit_14"],
                   help="model names, comma-separated (default t2t_vit_7,t2t_vit_14)")
    p.add_argument("--img-size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--batches", type=comma_list(int), default=[1, 8], help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--out", default="reports", help="report folder (default reports)")
    p.add_argument("--work", default="artifacts/bench-calib", help="folder for the benchmarked graphs")
    p.add_argument("--calib-data", default=None, help="ImageFolder tree for the int8 ranges (default: noise)")
    p.add_argument("--calib-images", type=int, default=16, help="calibration images for the int8 graphs (default 16)")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed runs per point (default 3)")
    p.add_argument("--min-iters", type=int, default=3, help="at least this many timed runs per point (default 3)")
    p.add_argument("--threads", default="auto", help="ONNX Runtime intra-op threads: a number or auto (idle cores)")
    p.add_argument("--name", default="bench-calib-cpu", help="report file stem (default bench-calib-cpu)")
    return p


def time_session(path: str | Path, batch: int, img_size: int, min_time: float, min_iters: int,
                 threads: int | None = None) -> dict[str, float]:
    """Median latency and throughput of one graph at one batch size (2 warm-up runs first)."""
    sess = ort_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size), dtype=np.float32)
    times = time_calls(lambda: sess.run(None, {name: x}), warmup=2, min_iters=min_iters, min_time_s=min_time)
    med = statistics.median(times)
    return {"batch": batch, "iters": len(times), "latency_ms_median": 1000 * med,
            "latency_ms_min": 1000 * min(times), "images_per_s": batch / med}


WEIGHTS = "random, t2t_vit.checkpoint.trained_like_(seed=0)"  # what the cached graphs in --work were exported from


def build_graphs(model_name: str, img_size: int, work: Path, calib_data: str | None, calib_images: int) -> dict[str, Path]:
    """fp32, fp16 (exporter), int8 (`make calib`'s TensorRT graph) and int8-fp32 (`make calib TARGET=cpu`'s)
    graphs of one model."""
    out = work / f"{model_name}-{img_size}"
    paths = {"fp32": out / f"{model_name}.fp32.onnx", "fp16": out / f"{model_name}.fp16.onnx",
             "int8": out / f"{model_name}.int8.onnx", "int8-fp32": out / f"{model_name}.int8-fp32.onnx"}
    stamp = out / "weights.txt"  # graphs cached in --work from other weights (a fresh init's zero biases) are redone
    # ... and so are graphs exported before the export recorded its recipe (build_qdq reads it).
    if not (paths["fp32"].is_file() and paths["fp16"].is_file()) or not stamp.is_file() \
            or stamp.read_text() != WEIGHTS or METADATA_KEY not in read_metadata(paths["fp32"]):
        for path in paths.values():
            path.unlink(missing_ok=True)
        torch.manual_seed(0)
        model = trained_like_(build_model(model_name, img_size=img_size).eval())
        export_model(model, out)
        stamp.write_text(WEIGHTS)
    # int8 graphs cached in --work by another build (not make calib's build_qdq, which records the target and
    # the calibration in the metadata) or from other calibration images are redone.
    meta = {"calib_policy": DEFAULT_POLICY, "calib_size": str(calib_images),
            "calib_data": str(calib_data) if calib_data else "gaussian noise"}
    targets = {"int8": "tensorrt", "int8-fp32": "cpu"}
    if not all(paths[k].is_file() and read_metadata(paths[k]).items() >= {**meta, "target": t}.items()
               for k, t in targets.items()):
        fp32 = ensure_opset(onnx.load(str(paths["fp32"])))
        if calib_data:
            cfg = DataConfig.from_metadata(read_metadata(paths["fp32"]))
            images = load_or_preprocess(select_samples(calib_data, calib_images, what="--calib-images"), cfg, out,
                                        progress=False).images.numpy()
        else:
            images = np.random.default_rng(0).standard_normal((calib_images, 3, img_size, img_size), dtype=np.float32)
        placement = Placement.from_model(fp32, DEFAULT_POLICY)
        reader = TensorDataReader(images, fp32.graph.input[0].name)
        with tempfile.TemporaryDirectory(prefix="t2t-bench-calib-") as tmp:  # one calibration, both targets
            cache = Path(tmp) / "ranges-entropy.json"
            for key, target in targets.items():
                build_qdq(fp32, placement, "entropy", reader, paths[key], target=target, cache=cache, meta=meta,
                           fp16_model=onnx.load(str(paths["fp16"])) if target == "tensorrt" else None)
    return paths


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    threads = apply_threads(args.threads)
    rows: list[dict[str, Any]] = []
    graphs = {m: build_graphs(m, args.img_size, Path(args.work), args.calib_data, args.calib_images)
              for m in args.models}
    points = [(m, p, b) for m in args.models for p in graphs[m] for b in args.batches]
    header = report_header("studies.bench_calib", argv)
    for m, prec, b in tqdm(points, desc="bench", unit="point"):
        r = time_session(graphs[m][prec], b, args.img_size, args.min_time, args.min_iters, threads)
        rows.append({"model": m, "precision": prec, "img_size": args.img_size, **r})
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"] and x["precision"] == "fp32")
        r["speedup_vs_fp32"] = r["images_per_s"] / base["images_per_s"]
    report = {**header, "load_average_after": load_average(), "threads": threads, "int8_policy": DEFAULT_POLICY,
              "results": rows}
    md = ["# ONNX Runtime CPU throughput: fp32 / fp16 / int8 graphs", "",
          f"`{report['command']}`", "",
          f"Host: {host_line(report['host'])} (at the start); load average after "
          f"{report['load_average_after']}. ONNX Runtime CPUExecutionProvider, {threads} threads; AVX-512 VNNI: "
          f"{'yes' if report['host']['avx512_vnni'] else 'no'}.", "",
          markdown_table(["model", "graph", "batch", "images/s", "median latency ms", "vs fp32"],
                         [[r["model"], r["precision"], r["batch"], r["images_per_s"], r["latency_ms_median"],
                           f"{r['speedup_vs_fp32']:.2f}x"] for r in rows]), "",
          "`int8` is the deployed graph (Q/DQ on the policy's MatMul/Gemm inputs, fp16 elsewhere); `int8-fp32` "
          "is `make calib TARGET=cpu`'s graph, the same Q/DQ placement over fp32, the form the CPU provider fuses "
          "into int8 kernels. The CPU "
          "provider has few fp16 kernels and wraps fp16 ops in casts, so fp16 and int8 graphs are slower than "
          "fp32 on a CPU: these graphs are built for TensorRT, and this table is a smoke-level cost check.", ""]
    write_report(Path(args.out) / args.name, report, "\n".join(md))
    print("\n".join(md))
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_command(lambda: run(args, argv) and 0, "studies.bench_calib")


if __name__ == "__main__":
    sys.exit(main())
