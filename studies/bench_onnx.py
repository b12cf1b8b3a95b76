"""Benchmark the exported graphs on ONNX Runtime's CPU provider (``make bench-onnx``).

For each model (default t2t_vit_7 and t2t_vit_14 at 224 px, random weights with the nonzero biases and
LayerNorm affines of a trained model, :func:`t2t_vit.checkpoint.trained_like_`, so no graph loses an Add of
zeros that a checkpoint's graph keeps) and in one run:

* ``patterned fp32`` - :func:`export.to_onnx.export_onnx` (one-hot Conv soft splits, explicit
  attention, onnxslim), the graph ``make onnx`` ships;
* ``plain fp32`` - a plain ``torch.onnx.export`` of the same model with its training-time forms
  (Unfold soft splits, SDPA attention) and torch 2.14's default exporter settings, not simplified;
* ``patterned fp16`` - the fp16 graph (float32 I/O);
* ``patterned fp32 (dynamo)`` - the patterned graph from the other exporter, for the exporter choice.

Each row: node count, file size, export time and ORT CPU throughput at batch 1 and 8 (the graphs of a
batch timed side by side in interleaved rounds, :func:`t2t_vit.timing.time_interleaved`). Writes
``<out>/bench-onnx-cpu.{json,md}`` with the hardware named.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from tqdm import tqdm

from t2t_vit.checkpoint import build_model, trained_like_
from t2t_vit.cli import apply_threads, comma_list, run_command
from t2t_vit.graphs import ort_session
from t2t_vit.reports import host_line, markdown_table, report_header, write_report
from t2t_vit.timing import load_average, time_interleaved

from export import to_onnx
from export.patterns import apply_export_patterns, op_census

__all__ = ["plain_export", "throughput_side_by_side", "bench_model", "get_args_parser", "main"]


def plain_export(model: torch.nn.Module, path: Path, opset: int = to_onnx.DEFAULT_OPSET) -> Path:
    """``torch.onnx.export`` of the model as trained (Unfold, SDPA), default exporter, no simplification."""
    ref = apply_export_patterns(model, patterns=False)
    x = torch.randn(2, 3, ref.img_size, ref.img_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, (x,), str(path), opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          external_data=False)
    return path


def throughput_side_by_side(paths: Sequence[Path], batch: int, img_size: int, min_runs: int = 5,
                            min_seconds: float = 3.0, threads: int | None = None) -> list[dict[str, Any]]:
    """ONNX Runtime CPU throughput (median latency, images/s) of several graphs, in the order given, timed in
    interleaved rounds (:func:`t2t_vit.timing.time_interleaved`): ``min_seconds`` and ``min_runs`` per graph
    over all rounds."""
    fns = {}
    for i, path in enumerate(paths):
        sess = ort_session(path, threads=threads)
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size)).astype(dtype)
        fns[i] = (lambda s=sess, n=inp.name, x=x: s.run(None, {n: x}))
    times = time_interleaved(fns, warmup=3, min_iters=min_runs, min_time_s=min_seconds)
    out = []
    for i in range(len(paths)):
        med = statistics.median(times[i])
        out.append({"batch": batch, "runs": len(times[i]), "median_ms": round(1e3 * med, 2),
                    "images_per_s": round(batch / med, 2)})
    return out


def bench_model(name: str, img_size: int | None, out: Path, batches: tuple[int, ...] = (1, 8),
                dynamo_row: bool = True, min_seconds: float = 3.0, threads: int | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = trained_like_(build_model(name, img_size=img_size).eval())
    size = model.img_size
    work = out / f".bench-{name}"
    work.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, Any]] = [
        ("patterned fp32", lambda p: to_onnx.export_onnx(model, p, "fp32")),
        ("plain fp32 (unfold, SDPA)", lambda p: plain_export(model, p)),
        ("patterned fp16", lambda p: to_onnx.export_onnx(model, p, "fp16")),
    ]
    if dynamo_row:
        variants.append(("patterned fp32 (dynamo exporter)", lambda p: to_onnx.export_onnx(
            model, p, "fp32", settings=to_onnx.ExportSettings(exporter="dynamo"))))
    rows, paths = [], []
    for label, make in tqdm(variants, desc=name, unit="graph"):
        path = work / (label.split(" (")[0].replace(" ", "-") + ("-dynamo" if "dynamo" in label else "") + ".onnx")
        t0 = time.perf_counter()
        make(path)
        export_s = time.perf_counter() - t0
        proto = onnx.load(str(path))
        rows.append({"graph": label, "nodes": len(proto.graph.node), "file_mib": round(path.stat().st_size / 2**20, 2),
                     "export_s": round(export_s, 1), "op_census": op_census(proto), "throughput": []})
        paths.append(path)
    # Every graph of a batch in interleaved rounds, so a change of machine speed reaches them alike.
    for b in batches:
        for row, t in zip(rows, throughput_side_by_side(paths, b, size, min_seconds=min_seconds, threads=threads)):
            row["throughput"].append(t)
    for path in paths:
        path.unlink()
    work.rmdir()
    return {"model": name, "img_size": size, "rows": rows,
            "weights": "random, trained-like biases and LayerNorm affines (t2t_vit.checkpoint.trained_like_)"}


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# ONNX Runtime CPU benchmark of the exported graphs", "",
             f"`{report['command']}`", "",
             f"Host: {host_line(report['host'])}; load average at the end {report['load_average_end']}. "
             f"ONNX Runtime CPUExecutionProvider, {report['threads']} threads. Throughput is images/s at the "
             f"median run latency; the graphs of one batch are timed side by side in interleaved rounds.", ""]
    for m in report["models"]:
        batches = [t["batch"] for t in m["rows"][0]["throughput"]]
        header = ["graph", "nodes", "file (MiB)", "export (s)"] + [c for b in batches for c in (f"img/s b{b}", f"ms b{b}")]
        rows = [[r["graph"], r["nodes"], f"{r['file_mib']:.2f}", f"{r['export_s']:.1f}"]
                + [v for t in r["throughput"] for v in (f"{t['images_per_s']:.1f}", f"{t['median_ms']:.1f}")]
                for r in m["rows"]]
        lines += [f"## {m['model']} ({m['img_size']} px)", "", markdown_table(header, rows, right=range(1, len(header)))]
        ops = sorted({op for r in m["rows"] for op in r["op_census"]})
        census = [[op] + [r["op_census"].get(op, 0) for r in m["rows"]] for op in ops]
        lines += ["", "<details><summary>op census</summary>", "",
                  markdown_table(["op"] + [r["graph"] for r in m["rows"]], census, right=range(1, len(m["rows"]) + 1))]
        lines += ["", "</details>", ""]
    lines += ["ONNX Runtime's CPU provider has few fp16 kernels: it inserts Casts and runs most fp16 nodes in "
              "float32, so the fp16 row measures the graph on CPU, not fp16 speed (that is TensorRT's job).", ""]
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ORT CPU benchmark: patterned vs plain vs fp16 ONNX graphs",
                                add_help=add_help)
    p.add_argument("--models", type=comma_list(str), default=["t2t_vit_7", "t2t_vit_14"],
                   help="models, comma-separated (default t2t_vit_7,t2t_vit_14)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: registry, 224)")
    p.add_argument("--batches", type=comma_list(int), default=[1, 8], help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    p.add_argument("--threads", default="auto", help="ONNX Runtime intra-op threads: a number or auto (idle cores)")
    p.add_argument("--no-dynamo-row", action="store_true", help="skip the dynamo-exporter row")
    p.add_argument("--out", default="reports", help="output folder (default reports)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        threads = apply_threads(args.threads)
        report: dict[str, Any] = {**report_header("studies.bench_onnx", argv), "threads": threads, "models": []}
        for name in args.models:
            report["models"].append(bench_model(name, args.img_size, out, tuple(args.batches),
                                                not args.no_dynamo_row, args.min_seconds, threads))
        report["load_average_end"] = load_average()
        md = render_markdown(report)
        write_report(out / "bench-onnx-cpu", report, md)
        print(md)
        return 0

    return run_command(body, "studies.bench_onnx")


if __name__ == "__main__":
    sys.exit(main())
