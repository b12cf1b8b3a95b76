"""Our Q/DQ graphs beside NVIDIA Model Optimizer's, on the same fp32 graph, calibration and val images.

``make modelopt MODEL=t2t_vit_7 OUT=... CALIB_DATA=../shared/data/imagenette2/train`` ::

    python -m calibration.compare_modelopt --model t2t_vit_7 --out artifacts/t2t_vit_7 \\
        --calib-data ../shared/data/imagenette2/train --calib-size 1024 --modes int8,fp8

1. plan: ModelOpt's interpreter (``--modelopt-python``, default ``.venv-modelopt/bin/python``, made by
   ``make modelopt-venv``) must exist, else one line and exit 2; the fp32 graph ``<out>/<model>.fp32.onnx``
   (exported first when missing, as ``make calib`` does);
2. calibration images: the same selection, preprocessing and cache as ``make calib``
   (:func:`calibration.data.select_samples`, :func:`calibration.data.load_or_preprocess`), written once as
   ``<out>/modelopt/calib-<n>-<key>.npy`` for ModelOpt's process;
3. ModelOpt: ``calibration/modelopt_runner.py`` in ModelOpt's virtualenv, once per mode, with ModelOpt's
   defaults and CPU calibration -> ``<out>/modelopt/<model>.modelopt-<mode>.onnx`` (+ ``.json`` result,
   ``.log``);
4. evaluation in this environment: fp32, our int8 (``<out>/<model>.int8.onnx`` from ``make calib``), our
   fp8 (``<out>/<model>.fp8.onnx`` from ``make calib PRECISION=fp8``; 'not built yet' while it is absent; each
   says whether it was calibrated on this run's images) and ModelOpt's graphs on ONNX
   Runtime CPU over the same val batches: top-1, agreement with fp32, max |dlogit|; and per graph the
   Q/DQ counts by consumer op type and the softmax-attention check (:mod:`calibration.mha_pattern`);
5. report ``reports/modelopt-<model>.{json,md}`` (``--report``). A ModelOpt failure is recorded in the
   report with its exact error, and the command then exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from t2t_vit.artifacts import default_out, onnx_path
from t2t_vit.cli import add_run_args, add_stage_args, apply_threads, run_command
from t2t_vit.data import DataConfig, DataError, ImageBatcher
from t2t_vit.errors import T2TError
from t2t_vit.files import OutputLock, atomic_write, ensure_dir, file_sha256
from t2t_vit.graphs import read_metadata
from t2t_vit.metrics import accuracy, compare_logits
from t2t_vit.reports import host_line, markdown_table, report_header, write_report

from .calib import ensure_fp32_onnx
from .data import folder_label_space, load_or_preprocess, select_samples
from .evaluate import evaluate_graphs
from .mha_pattern import const_values, mha_patterns, qdq_dtype, summarize_patterns

_logger = logging.getLogger("calibration.compare_modelopt")

__all__ = ["CompareError", "MODES", "RUNNER", "get_args_parser", "check_modelopt_python", "qdq_counts",
           "nonfinite_tensors", "graph_summary", "run_modelopt", "build_report", "render_markdown", "run", "main"]

MODES = ("int8", "fp8")
RUNNER = Path(__file__).with_name("modelopt_runner.py")
DEFAULT_PYTHON = ".venv-modelopt/bin/python"
NOT_BUILT = "not built yet"


class CompareError(T2TError):
    """The side-by-side cannot run (no ModelOpt environment, no data) or ModelOpt failed (report written)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Our int8/fp8 Q/DQ graphs beside NVIDIA Model Optimizer's, on ONNX "
                                            "Runtime CPU", add_help=add_help)
    add_stage_args(p, checkpoint_help="weights; used to export <out>/<model>.fp32.onnx when it is missing or stale")
    add_run_args(p, batch_size=32, workers=2)
    g = p.add_argument_group("side by side")
    g.add_argument("--calib-data", required=True, help="ImageFolder tree of calibration images (as make calib)")
    g.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024, as make calib)")
    g.add_argument("--seed", type=int, default=0, help="selection seed (default 0, as make calib)")
    g.add_argument("--val-data", default=None, help="labeled ImageFolder tree (default: 'val' beside --calib-data)")
    g.add_argument("--val-size", type=int, default=None, help="class-balanced subset of the val images (default all)")
    g.add_argument("--modes", default=",".join(MODES),
                   help="ModelOpt quantize_mode(s), comma separated (default int8,fp8)")
    g.add_argument("--modelopt-python", default=DEFAULT_PYTHON,
                   help=f"the interpreter of ModelOpt's own virtualenv (default {DEFAULT_PYTHON}; make modelopt-venv)")
    g.add_argument("--calibration-method", default=None, choices=("entropy", "max"),
                   help="ModelOpt's calibration_method (default: ModelOpt's own, entropy)")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds per ModelOpt run (default 3600)")
    g.add_argument("--report", default=None, help="report stem (default reports/modelopt-<model>)")
    g.add_argument("--note", default=None,
                   help="a sentence for the report (what the checkpoint is, why the run is small)")
    return p


def _modes(spec: str) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise CompareError(f"--modes {spec!r}: unknown mode(s) {bad}; choose from {list(MODES)}")
    return list(dict.fromkeys(modes))


def check_modelopt_python(python: str | os.PathLike) -> Path:
    """The ModelOpt interpreter, or :class:`CompareError` saying how to make it (checked before anything runs)."""
    path = Path(python)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise CompareError(f"ModelOpt's virtualenv is missing: {path} is not an executable interpreter; create it with "
                           f"`make modelopt-venv` (or pass --modelopt-python / MODELOPT_VENV=...)")
    return path.absolute()  # not resolve(): a venv's python is a symlink that must keep its venv path


def qdq_counts(model: onnx.ModelProto) -> dict[str, Any]:
    """QuantizeLinear/DequantizeLinear counts: totals, element types (zero point's type), the op types the DQ
    outputs feed, and how many DQ read a constant (weights) rather than a Q (activations)."""
    g = model.graph
    consts = const_values(model)
    cons: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n.op_type)
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    feeds: Counter = Counter()
    for n in dq:
        for op in cons.get(n.output[0], []) or ["(graph output)"]:
            feeds[op] += 1
    dq_types: Counter = Counter()
    for n in dq:
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        x = consts.get(n.input[0])
        t = zp.data_type if zp is not None else (x.data_type if x is not None else None)
        dq_types[onnx.TensorProto.DataType.Name(t).lower() if t else "uint8"] += 1
    return {"quantize": len(q), "dequantize": len(dq), "weight_dq": sum(n.input[0] in consts for n in dq),
            "q_types": dict(Counter(qdq_dtype(n, consts) for n in q)), "dq_types": dict(dq_types),
            "dq_feeds": dict(sorted(feeds.items()))}


def graph_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Opset, Q/DQ counts and the softmax-attention check of one ONNX file."""
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    patterns = mha_patterns(model)
    return {"path": str(path), "opset": opset, "nodes": len(model.graph.node), "qdq": qdq_counts(model),
            "attention": summarize_patterns(patterns), "attentions": [p.as_dict() for p in patterns]}


def run_modelopt(python: Path, fp32: Path, calib_npy: Path, mode: str, folder: Path, model: str,
                 threads: int, timeout: float, method: str | None = None) -> dict[str, Any]:
    """One ModelOpt run in its own process; returns its result JSON (with ``log``), never raises for its errors."""
    out = folder / f"{model}.modelopt-{mode}.onnx"
    result_path, log_path = out.with_suffix(".json"), out.with_suffix(".log")
    result_path.unlink(missing_ok=True)
    out.unlink(missing_ok=True)  # a failed run must not leave an older run's graph looking like its output
    cmd = [str(python), str(RUNNER), "--onnx", str(fp32), "--calib", str(calib_npy), "--mode", mode,
           "--output", str(out), "--result", str(result_path)]
    cmd += ["--calibration-method", method] if method else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)  # ModelOpt's process must not import this project's environment
    print(f"[modelopt {mode}] {' '.join(cmd)} (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b""), None
    atomic_write(log_path, lambda f: f.write(log))
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log.decode(errors="replace").strip().splitlines()[-15:]
        what = f"timed out after {timeout:.0f} s" if rc is None else f"exited {rc} without a result"
        result = {"ok": False, "mode": mode, "error": {"type": "ProcessError", "message": f"ModelOpt's process {what}",
                                                       "traceback": tail}}
    result.update(log=str(log_path), command=cmd, wall_seconds=round(time.perf_counter() - t0, 1))
    return result


def nonfinite_tensors(fp32: Path, images: np.ndarray, threads: int = 1) -> list[dict[str, Any]]:
    """The fp32 graph's tensors that hold inf/NaN on ``images`` (every node output made a graph output, ONNX
    Runtime CPU without graph optimisation): a calibrator that histograms every tensor fails on them."""
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    op_of = {o: n.op_type for n in model.graph.node for o in n.output if o}
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in op_of)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    found = []
    for name, value in zip(names, sess.run(names, {sess.get_inputs()[0].name: images.astype(np.float32)})):
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            found.append({"tensor": name, "op": op_of[name], "inf": int(np.isinf(value).sum()),
                          "nan": int(np.isnan(value).sum())})
    return found


def calibration_npy(args: argparse.Namespace, out: Path, config: DataConfig) -> tuple[Path, dict[str, Any]]:
    """The calibration images ``make calib`` uses (same selection, preprocessing and cache), as one .npy."""
    calib_root = Path(args.calib_data)
    if not calib_root.is_dir():
        raise CompareError(f"CALIB_DATA (--calib-data) {calib_root} is not a folder; point it at an ImageFolder tree, "
                           f"e.g. CALIB_DATA=../shared/data/imagenette2/train")
    try:
        samples = select_samples(calib_root, args.calib_size, args.seed, what="CALIB_SIZE (--calib-size)")
    except DataError as e:
        raise DataError(f"CALIB_DATA (--calib-data): {e}") from e
    cached = load_or_preprocess(samples, config, out / "calib-cache", prefix=f"calib-{args.model}",
                                batch_size=args.batch_size, num_workers=args.workers, progress=not args.no_progress)
    key = cached.cache_path.stem.rsplit("-", 1)[-1]
    npy = ensure_dir(out / "modelopt") / f"calib-{len(cached.paths)}-{key}.npy"
    if not npy.is_file():
        atomic_write(npy, lambda f: np.save(f, cached.images.numpy().astype(np.float32)))
    return npy, {"data": str(calib_root), "size": len(cached.paths), "seed": args.seed, "data_key": key,
                 "cache": str(cached.cache_path), "npy": str(npy)}


def _our_graphs(out: Path, model: str, data_key: str) -> dict[str, dict[str, Any]]:
    """Our int8 graph (from make calib) and fp8 graph, each with a status and, for int8, whether it was
    calibrated on the same images."""
    ours: dict[str, dict[str, Any]] = {}
    for prec, how in (("int8", "make calib"), ("fp8", "make calib PRECISION=fp8")):
        path = onnx_path(out, model, prec)
        if not path.is_file():
            ours[f"ours-{prec}"] = {"source": "ours", "mode": prec, "status": NOT_BUILT, "path": str(path),
                                    "note": f"{path.name} not found: `{how}` builds it"}
            continue
        meta = read_metadata(path)
        same = meta.get("calib_data_key") == data_key
        ours[f"ours-{prec}"] = {"source": "ours", "mode": prec, "status": "ok", "path": str(path),
                                "calib_method": meta.get("calib_method"), "calib_size": meta.get("calib_size"),
                                "same_calibration_images": same,
                                "note": "" if same else f"calibrated on other images (data key "
                                                        f"{meta.get('calib_data_key')}, this run {data_key})"}
    return ours


def _evaluate(args: argparse.Namespace, graphs: Mapping[str, Path], meta: Mapping[str, str], config: DataConfig,
              threads: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    val_root = Path(args.val_data) if args.val_data else Path(args.calib_data).parent / "val"
    if not val_root.is_dir():
        raise CompareError(f"no labeled val folder {val_root}: pass --val-data (ARGS=\"--val-data DIR\")")
    samples = select_samples(val_root, args.val_size, args.seed, class_to_idx=folder_label_space(meta, val_root),
                             strict=False, what="--val-size")
    batcher = ImageBatcher(samples, config, batch_size=args.batch_size, num_workers=args.workers)
    logits, labels = evaluate_graphs({k: str(v) for k, v in graphs.items()}, batcher, threads=threads,
                                     total=len(batcher), progress=not args.no_progress)
    ref = logits["fp32"]
    acc = {k: accuracy(v, labels) if k == "fp32" else compare_logits(ref, v, labels) for k, v in logits.items()}
    return acc, {"data": str(val_root), "images": int(len(labels)), "skipped": len(batcher.skipped)}


def build_report(header: Mapping[str, Any], setup: Mapping[str, Any], graphs: Mapping[str, Mapping[str, Any]],
                 accuracy_by_graph: Mapping[str, Mapping[str, Any]], validation: Mapping[str, Any] | None) -> dict:
    """The report: header, setup (model, fp32 graph, calibration, threads, ModelOpt environment), one entry per
    graph (status, Q/DQ counts, attention check, accuracy where it ran) and the ModelOpt errors."""
    entries: dict[str, dict[str, Any]] = {}
    for name, g in graphs.items():
        e = dict(g)
        if name in accuracy_by_graph:
            e["accuracy"] = dict(accuracy_by_graph[name])
            if name != "fp32" and "fp32" in accuracy_by_graph:
                e["accuracy"]["top1_drop"] = accuracy_by_graph["fp32"]["top1"] - e["accuracy"]["top1"]
        entries[name] = e
    errors = {n: g["error"] for n, g in graphs.items() if g.get("status") == "failed" and g.get("error")}
    return {**header, **setup, "validation": dict(validation) if validation else None, "graphs": entries,
            "modelopt_errors": errors}


def _graph_row(name: str, g: Mapping[str, Any]) -> list[Any]:
    a, s = g.get("accuracy", {}), g.get("summary") or {}
    q, att = s.get("qdq", {}), s.get("attention", {})
    types = ", ".join(f"{k} {v}" for k, v in sorted(q.get("q_types", {}).items())) or "-"
    feeds = ", ".join(f"{k} {v}" for k, v in q.get("dq_feeds", {}).items()) or "-"
    fus = f"{att['fp8_fusable']}/{att['attentions']}" if att else "-"
    placed = f"{att['qdq_placed']}/{att['attentions']}" if att else "-"
    direct = f"{att.get('dq_direct', 0)}/{att['attentions']}" if att else "-"
    status = g.get("status", "ok")
    if status == "failed":
        status = f"failed: {g.get('error', {}).get('type', '?')}"
    return [name, status, a.get("top1"), a.get("top1_drop"), a.get("top1_agreement"), a.get("max_abs_dlogit"),
            q.get("quantize"), q.get("dequantize"), types, feeds, placed, direct, fus,
            ", ".join(att.get("scale", [])) or "-"]


def render_markdown(r: Mapping[str, Any]) -> str:
    """The Markdown side of :func:`build_report`'s report."""
    cal, val, mo = r["calibration"], r.get("validation"), r.get("modelopt", {})
    lines = [f"# Our Q/DQ graphs beside NVIDIA Model Optimizer's: {r['model']}", "", f"`{r['command']}`", "",
             f"fp32 graph `{r['fp32_onnx']}` ({r.get('img_size')} px). Calibration: {cal['size']} images from "
             f"`{cal['data']}` (seed {cal['seed']}, class-balanced, the selection and preprocessing of `make calib`), "
             f"given to ModelOpt {mo.get('version') or '(not run)'} as one array with its defaults "
             f"and CPU calibration (`calibration_eps=['cpu']`; calibration method: "
             f"{mo.get('calibration_method', '?')}). ModelOpt's environment: "
             f"`{mo.get('python')}` ({mo.get('versions') or 'versions unknown'})."]
    if r.get("note"):
        lines += ["", r["note"]]
    lines.append("")
    if val:
        lines += [f"ONNX Runtime CPU in the project's environment, {r.get('threads')} thread(s), {val['images']} "
                  f"labeled images from `{val['data']}`. Host: {host_line(r['host'])}.", ""]
    rows = [_graph_row(n, g) for n, g in r["graphs"].items()]
    lines += [markdown_table(["graph", "status", "top-1 %", "top-1 drop", "agreement with fp32 %", "max abs dlogit",
                              "Q", "DQ", "Q types", "DQ feeds", "attention Q/DQ placed", "DQ feeds BMM directly",
                              "FP8 MHA fusable",
                              "scale on"], rows), ""]
    lines += ["'attention Q/DQ placed': softmax attentions with Q/DQ on Q, K, V and the softmax output and the "
              "scale not on the scores; 'FP8 MHA fusable': the same with float8e4m3fn Q/DQ, the pattern TensorRT's "
              "FP8 MHA fusion needs (`calibration.mha_pattern`, docs/fp8.md); 'DQ feeds BMM directly': no "
              "Transpose/Reshape between those DQs and the MatMuls. 'scale on': q = the attention scale multiplies Q "
              "before BMM1.", ""]
    for n, g in r["graphs"].items():
        if g.get("note"):
            lines.append(f"- {n}: {g['note']}")
    for n, e in r.get("modelopt_errors", {}).items():
        lines += [f"- {n} failed: `{e.get('type')}: {e.get('message')}` (full traceback in the JSON report)"]
    bad = r.get("fp32_nonfinite")
    if bad:
        found = ", ".join(f"`{b['tensor']}` ({b['op']}: {b['inf']} inf, {b['nan']} NaN)" for b in bad[:5])
        lines += [f"- the fp32 graph holds inf/NaN in {len(bad)} tensor(s) on the first calibration images (a "
                  f"histogram of such a tensor has no finite range: the likely cause of a histogram-calibration "
                  f"failure): {found}"]
    return "\n".join(lines).rstrip() + "\n"


def _modelopt_graphs(args: argparse.Namespace, python: Path, fp32: Path, npy: Path, out: Path,
                     threads: int) -> dict[str, dict[str, Any]]:
    graphs: dict[str, dict[str, Any]] = {}
    for mode in _modes(args.modes):
        res = run_modelopt(python, fp32, npy, mode, out / "modelopt", args.model, threads, args.timeout,
                           args.calibration_method)
        entry = {"source": "modelopt", "mode": mode, "status": "ok" if res.get("ok") else "failed",
                 "path": res.get("output"), "result": {k: v for k, v in res.items() if k != "error"}}
        if not res.get("ok"):
            entry["error"] = res.get("error")
            print(f"[modelopt {mode}] FAILED: {res.get('error', {}).get('type')}: "
                  f"{res.get('error', {}).get('message')}", flush=True)
        graphs[f"modelopt-{mode}"] = entry
    return graphs


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Plan (ModelOpt's interpreter first), execute (calibration array, ModelOpt runs), report."""
    python = check_modelopt_python(args.modelopt_python)
    _modes(args.modes)
    out = Path(args.out) if args.out else default_out(args.model)
    with OutputLock(out):
        threads = apply_threads(args.threads)
        fp32 = ensure_fp32_onnx(args, out)
        meta = read_metadata(fp32)
        config = DataConfig.from_metadata(meta)
        npy, cal = calibration_npy(args, out, config)
        print(f"calibration set: {cal['size']} images -> {npy}", flush=True)
        graphs: dict[str, dict[str, Any]] = {"fp32": {"source": "export", "mode": "fp32", "status": "ok",
                                                      "path": str(fp32)}}
        graphs.update(_our_graphs(out, args.model, cal["data_key"]))
        graphs.update(_modelopt_graphs(args, python, fp32, npy, out, threads))
        for g in graphs.values():
            if g["status"] == "ok":
                g["summary"] = graph_summary(g["path"])
        runnable = {n: Path(g["path"]) for n, g in graphs.items() if g["status"] == "ok"}
        acc, validation = _evaluate(args, runnable, meta, config, threads)
    mo = next((g["result"] for g in graphs.values() if g["source"] == "modelopt" and g["result"].get("modelopt")), {})
    setup = {"model": args.model, "img_size": meta.get("img_size"), "fp32_onnx": str(fp32),
             "fp32_sha256": file_sha256(fp32), "checkpoint_sha256": meta.get("checkpoint_sha256"),
             "threads": threads, "calibration": cal,
             "modelopt": {"python": str(python), "version": mo.get("modelopt"),
                          "versions": f"onnx {mo.get('onnx')}, onnxruntime {mo.get('onnxruntime')}" if mo else None,
                          "calibration_method": args.calibration_method or "ModelOpt's default (entropy)",
                          "defaults_overridden": ["calibration_eps=['cpu']", "calibration_data (this run's images)",
                                                  "output_path"] + ([f"calibration_method={args.calibration_method!r}"]
                                                                    if args.calibration_method else [])}}
    if args.note:
        setup["note"] = args.note
    elif not args.checkpoint:
        setup["note"] = ("**Random weights** (no --checkpoint): accuracy columns only compare the graphs with each "
                         "other, not with a trained model.")
    if any(g["status"] == "failed" for g in graphs.values()):
        setup["fp32_nonfinite"] = nonfinite_tensors(fp32, np.load(npy)[:8], threads)
    report = build_report(report_header("calibration.compare_modelopt", argv), setup, graphs, acc, validation)
    stem = Path(args.report) if args.report else Path("reports") / f"modelopt-{args.model}"
    md = render_markdown(report)
    write_report(stem, report, md)
    print(md, flush=True)
    if report["modelopt_errors"]:
        first, err = next(iter(report["modelopt_errors"].items()))
        raise CompareError(f"ModelOpt could not quantize ({first}): {err.get('type')}: "
                           f"{str(err.get('message')).splitlines()[0] if err.get('message') else ''}; the report "
                           f"records the exact error: {stem}.md")
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: run(args, argv) and 0, "calibration.compare_modelopt")


if __name__ == "__main__":
    sys.exit(main())
