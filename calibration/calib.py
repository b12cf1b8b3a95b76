"""Calibrate and quantize an exported T2T-ViT to an int8 Q/DQ ONNX graph, and measure what it costs.

``make calib MODEL=t2t_vit_7 CHECKPOINT=... CALIB_DATA=/data/imagenet/train`` ::

    python -m calibration.calib --model t2t_vit_7 --checkpoint ckpt.pth --out artifacts/t2t_vit_7 \\
        --calib-data /data/imagenette2/train --val-data /data/imagenette2/val --method entropy,percentile,max

1. reads ``<out>/<model>.fp32.onnx`` (exported first with ``python -m export.to_onnx`` when missing or
   made from another checkpoint) and its data config from the ONNX metadata;
2. selects ``--calib-size`` images (seeded, class-balanced), preprocesses them with the model's eval
   transform through :class:`t2t_vit.data.ImageBatcher` and caches the tensor under ``<out>/``;
3. for each method: calibrates with onnxruntime.quantization (range cache kept under ``<out>/``),
   quantizes the policy's MatMul/Gemm inputs (:mod:`calibration.policy`), converts the rest to fp16
   except the Performer's linear-attention core, which stays fp32 as in the fp16 export,
   checks the Q/DQ pattern and writes ``<out>/<model>.int8.onnx`` (the first method) and
   ``<out>/<model>.int8-<method>.onnx`` (the others);
4. evaluates fp32, fp16 and every int8 graph on ONNX Runtime CPU on the labeled ``--val-data`` images
   (decoded once) and writes ``<out>/<model>.calib.{json,md}``;
5. optionally (``--sensitivity stage|family``) quantizes one group at a time and reports its top-1 drop;
6. exits 1 when the int8 top-1 drop exceeds ``--max-drop`` points.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_logger = logging.getLogger("calibration")

__all__ = ["CalibrationError", "get_args_parser", "run", "render_markdown", "main"]


class CalibrationError(RuntimeError):
    """A calibration run that cannot go on (missing export, no validation data, accuracy drop)."""


class AccuracyDropError(CalibrationError):
    """The int8 graph lost more top-1 than allowed."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from .policy import DEFAULT_POLICY, POLICIES

    p = argparse.ArgumentParser(description="INT8 Q/DQ calibration and accuracy check on ONNX Runtime CPU",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="registered model name, e.g. t2t_vit_7")
    p.add_argument("--checkpoint", default=None,
                   help="weights; used to export <out>/<model>.fp32.onnx when it is missing or stale")
    p.add_argument("--img-size", type=int, default=None, help="input size for the export (default: checkpoint/registry)")
    p.add_argument("--out", default=None, help="artifact folder (default: artifacts/<model>)")
    p.add_argument("--calib-data", required=True, help="ImageFolder tree of calibration images (e.g. imagenet/train)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    p.add_argument("--method", default="entropy",
                   help="calibration method(s), comma separated: entropy, percentile, max, or 'all' "
                        "(default entropy; the first one writes <model>.int8.onnx)")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile for --method percentile (default 99.99)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                   help=f"placement policy (default {DEFAULT_POLICY}; see calibration/policy.py)")
    p.add_argument("--exclude-t2t", action="store_true", help="keep the whole T2T stage in fp16")
    p.add_argument("--val-data", default=None,
                   help="labeled ImageFolder tree for accuracy (default: the 'val' folder beside --calib-data)")
    p.add_argument("--val-size", type=int, default=None, help="class-balanced subset of the validation images (default all)")
    p.add_argument("--no-eval", action="store_true", help="quantize only: no accuracy report, no threshold check")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="fail when int8 top-1 is more than this many points below fp32 (default 1.0)")
    p.add_argument("--sensitivity", choices=("stage", "family"), default=None,
                   help="also quantize one group at a time (per block or per op family) and report each top-1 drop")
    p.add_argument("--batch-size", type=int, default=32, help="preprocessing/evaluation batch size (default 32)")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers (default 2)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--report", default=None,
                   help="also write the report to REPORT.json / REPORT.md (e.g. reports/calib-imagenette-t2t_vit_7)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _methods(spec: str) -> list[str]:
    from .quantize import METHODS

    names = list(METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise CalibrationError(f"unknown calibration method(s) {bad or spec!r}; choose from {list(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def _export_command(args: argparse.Namespace, out: Path) -> list[str]:
    # --no-fail: the exporter's own fp16-vs-fp32 validation verdict is its report's business; this stage
    # needs the graphs and measures int8 against them itself.
    cmd = [sys.executable, "-m", "export.to_onnx", "--model", args.model, "--out", str(out), "--no-fail"]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    if args.img_size:
        cmd += ["--img-size", str(args.img_size)]
    return cmd


def ensure_fp32_onnx(args: argparse.Namespace, out: Path) -> Path:
    """``<out>/<model>.fp32.onnx``, exported first when missing or made from another checkpoint."""
    import importlib.util

    path = out / f"{args.model}.fp32.onnx"
    reason = None
    if not path.is_file():
        reason = f"{path} does not exist"
    elif args.checkpoint:
        from t2t_vit.checkpoint import file_sha256

        from .quantize import read_metadata

        recorded = read_metadata(path).get("checkpoint_sha256", "")
        if recorded and recorded != file_sha256(args.checkpoint):
            reason = f"{path} was exported from another checkpoint (sha256 {recorded[:12]}...)"
    if reason is None:
        return path
    cmd = _export_command(args, out)
    shown = " ".join(["python"] + cmd[1:])
    if importlib.util.find_spec("export.to_onnx") is None:
        raise CalibrationError(f"{reason}; export it first: {shown}  (or `make onnx MODEL={args.model} ...`)")
    print(f"{reason}: exporting it first: {shown}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0 or not path.is_file():
        raise CalibrationError(f"the export failed (exit {rc}); run it by hand to see why: {shown}")
    return path


def _default_val(calib_data: Path) -> Path | None:
    cand = calib_data.parent / "val"
    return cand if cand.is_dir() and cand.resolve() != calib_data.resolve() else None


def _range_cache(out: Path, model: str, method: str, fp32_sha: str, data_key: str, percentile: float) -> Path:
    key = hashlib.sha256(f"{fp32_sha}|{data_key}|{method}|{percentile}".encode()).hexdigest()[:16]
    return out / "calib-cache" / f"{model}.ranges-{method}-{key}.json"


def _int8_metadata(meta: dict[str, str], **extra: Any) -> dict[str, str]:
    out = dict(meta)
    out.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})
    out["precision"] = "int8"
    return out


def _set_metadata(model, meta: dict[str, str]) -> None:
    import onnx

    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)


def build_int8(fp32_model, nodes: list[str], method: str, reader, cache: Path, percentile: float,
               meta: dict[str, str], path: Path) -> dict[str, Any]:
    """Quantize, convert to the mixed fp16 graph, check the Q/DQ pattern, write ``path``."""
    from .quantize import check_qdq, fp32_island, quantize_model, save_model_atomic, to_mixed_fp16

    t0 = time.perf_counter()
    cache.parent.mkdir(parents=True, exist_ok=True)
    reused = cache.is_file()
    qdq = quantize_model(fp32_model, nodes, method, reader=None if reused else reader, cache_path=cache,
                         percentile=percentile)
    mixed = to_mixed_fp16(qdq)  # the Performer cores stay fp32, as in the fp16 export
    check = check_qdq(mixed, nodes)
    island = fp32_island(mixed)
    # Same key and value as the fp16 export's metadata, so a reader of either graph sees the same island.
    _set_metadata(mixed, {**meta, "fp32_islands": island["pattern"]})
    save_model_atomic(mixed, path)
    return {"path": str(path), "qdq_check": check, "fp32_island": island, "ranges_cache": str(cache),
            "ranges_reused": reused, "seconds": round(time.perf_counter() - t0, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole calibration run; returns the report (also written to ``<out>/<model>.calib.{json,md}``)."""
    import onnx

    from t2t_vit.data import DataConfig, ImageBatcher

    from .data import label_space, load_or_preprocess, select_samples
    from .evaluate import compare_logits, evaluate_graphs, hardware_info, write_json, write_text
    from .policy import Placement, group_nodes
    from .quantize import TensorDataReader, ensure_opset, read_metadata

    t_start = time.perf_counter()
    out = Path(args.out or f"artifacts/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    methods = _methods(args.method)
    calib_root = Path(args.calib_data)
    val_root = Path(args.val_data) if args.val_data else _default_val(calib_root)
    if not args.no_eval and val_root is None:
        raise CalibrationError(
            f"no labeled validation folder: pass --val-data (no 'val' folder beside {calib_root}), "
            f"or --no-eval to quantize without the accuracy check"
        )
    if not args.checkpoint:
        _logger.warning("no --checkpoint: a missing fp32 ONNX will be exported with RANDOM weights")

    fp32_path = ensure_fp32_onnx(args, out)
    meta = read_metadata(fp32_path)
    config = DataConfig.from_metadata(meta)  # preprocessing is recorded, never guessed
    fp32_sha = hashlib.sha256(fp32_path.read_bytes()).hexdigest()

    # 1. calibration images (cached)
    samples = select_samples(calib_root, args.calib_size, args.seed)
    cached = load_or_preprocess(samples, config, out / "calib-cache", prefix=f"calib-{args.model}",
                                batch_size=args.batch_size, num_workers=args.workers,
                                progress=not args.no_progress)
    data_key = cached.cache_path.stem.rsplit("-", 1)[-1]
    print(f"calibration set: {len(cached.paths)} images from {calib_root} "
          f"({'cache hit' if cached.from_cache else 'decoded and cached'}: {cached.cache_path})", flush=True)

    # 2. placement
    fp32_model = ensure_opset(onnx.load(str(fp32_path)))
    placement = Placement.from_model(fp32_model, args.policy, args.exclude_t2t)
    print(placement.describe(), flush=True)
    nodes = placement.node_names
    input_name = fp32_model.graph.input[0].name
    reader = TensorDataReader(cached.images.numpy(), input_name=input_name)

    # 3. one int8 graph per method
    int8: dict[str, dict[str, Any]] = {}
    for i, method in enumerate(methods):
        path = out / (f"{args.model}.int8.onnx" if i == 0 else f"{args.model}.int8-{method}.onnx")
        cache = _range_cache(out, args.model, method, fp32_sha, data_key, args.percentile)
        info = _int8_metadata(meta, calib_method=method, calib_policy=args.policy, calib_exclude_t2t=str(args.exclude_t2t).lower(),
                              calib_size=str(len(cached.paths)), calib_data_key=data_key,
                              calib_percentile=str(args.percentile) if method == "percentile" else "",
                              quantized_nodes=str(len(nodes)), float_dtype="float16")
        print(f"[{method}] calibrating and quantizing {len(nodes)} nodes -> {path}", flush=True)
        int8[method] = build_int8(fp32_model, nodes, method, reader, cache, args.percentile, info, path)
        print(f"[{method}] Q/DQ pattern ok: {int8[method]['qdq_check']}", flush=True)

    # 4. sensitivity graphs (first method's ranges, one group quantized at a time)
    sens_graphs: dict[str, Path] = {}
    groups = {}
    if args.sensitivity:
        groups = group_nodes(placement.quantized, args.sensitivity)
        method = methods[0]
        cache = _range_cache(out, args.model, method, fp32_sha, data_key, args.percentile)
        for g, cands in groups.items():
            path = out / "sensitivity" / f"{args.model}.int8-{method}-only-{g}.onnx"
            build_int8(fp32_model, [c.name for c in cands], method, reader, cache, args.percentile,
                       _int8_metadata(meta, calib_method=method, sensitivity_group=g), path)
            sens_graphs[g] = path

    report: dict[str, Any] = {
        "model": args.model,
        "command": "python -m calibration.calib " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "hardware": hardware_info(),
        "fp32_onnx": str(fp32_path),
        "fp32_sha256": fp32_sha,
        "metadata": {k: meta.get(k) for k in ("model", "num_classes", "checkpoint_sha256", "img_size")},
        "calibration": {"data": str(calib_root), "size": len(cached.paths), "seed": args.seed,
                        "cache": str(cached.cache_path), "cache_hit": cached.from_cache,
                        "methods": methods, "percentile": args.percentile},
        "placement": placement.as_dict(),
        "int8": int8,
        "max_drop": args.max_drop,
    }
    first = int8[methods[0]]["fp32_island"]
    report["fp32_island"] = {"pattern": first["pattern"], "nodes": len(first["nodes"]),
                             "reason": first["fp32_tensors"][0]["reason"] if first["fp32_tensors"] else "",
                             "note": "the same island in every int8 graph of this report; the node and tensor "
                                     "lists are under int8.<method>.fp32_island"}

    # 5. accuracy on ONNX Runtime CPU
    if not args.no_eval:
        graphs: dict[str, Path] = {"fp32": fp32_path}
        fp16_path = out / f"{args.model}.fp16.onnx"
        if fp16_path.is_file():
            graphs["fp16"] = fp16_path
        else:
            print(f"note: {fp16_path} not found; the fp16 column is skipped", flush=True)
        for m, r in int8.items():
            graphs[f"int8-{m}"] = Path(r["path"])
        for g, p in sens_graphs.items():
            graphs[f"only:{g}"] = p
        val_samples = select_samples(val_root, args.val_size, args.seed,
                                     class_to_idx=label_space(meta, val_root), strict=False)
        batcher = ImageBatcher(val_samples, config, batch_size=args.batch_size, num_workers=args.workers)
        logits, labels = evaluate_graphs({k: str(v) for k, v in graphs.items()}, batcher, threads=args.threads,
                                         total=len(batcher), progress=not args.no_progress)
        ref = logits["fp32"]
        acc = {k: compare_logits(v, labels, None if k == "fp32" else ref) for k, v in logits.items()}
        for k, v in acc.items():
            if k != "fp32":
                v["top1_drop"] = acc["fp32"]["top1"] - v["top1"]
        report["validation"] = {"data": str(val_root), "images": int(len(labels)), "skipped": len(batcher.skipped)}
        report["accuracy"] = {k: v for k, v in acc.items() if not k.startswith("only:")}
        if sens_graphs:
            report["sensitivity"] = {
                "grouping": args.sensitivity, "method": methods[0],
                "groups": {g: {"nodes": len(groups[g]), "top1": acc[f"only:{g}"]["top1"],
                               "top1_drop": acc[f"only:{g}"]["top1_drop"],
                               "top1_agreement": acc[f"only:{g}"]["top1_agreement"]} for g in sens_graphs},
            }
        primary = f"int8-{methods[0]}"
        report["primary"] = {"graph": str(out / f"{args.model}.int8.onnx"), "method": methods[0],
                             "top1_drop": acc[primary]["top1_drop"], "passed": acc[primary]["top1_drop"] <= args.max_drop}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    md = render_markdown(report)
    targets = [out / f"{args.model}.calib"]
    if args.report:
        targets.append(Path(args.report))
    for stem in targets:
        write_json(report, stem.with_name(stem.name + ".json"))
        write_text(md, stem.with_name(stem.name + ".md"))
    print(md, flush=True)
    if "primary" in report and not report["primary"]["passed"]:
        raise AccuracyDropError(
            f"int8 top-1 dropped {report['primary']['top1_drop']:.2f} points ({methods[0]} calibration), more than "
            f"--max-drop {args.max_drop}; try another --method (percentile, max), --exclude-t2t, a narrower "
            f"--policy, or --sensitivity stage to find the layers to keep in fp16. Report: {targets[0]}.md"
        )
    return report


def render_markdown(r: dict[str, Any]) -> str:
    from .evaluate import markdown_table

    hw = r["hardware"]
    cal = r["calibration"]
    pl = r["placement"]
    lines = [f"# INT8 calibration: {r['model']}", "",
             f"`{r['command']}`", "",
             f"Calibration: {cal['size']} images from `{cal['data']}` (seed {cal['seed']}, class-balanced), "
             f"methods {', '.join(cal['methods'])} (percentile {cal['percentile']}). "
             f"Policy `{pl['policy']}`{' with the T2T stage excluded' if pl['exclude_t2t'] else ''}: "
             f"{len(pl['quantized'])} MatMul/Gemm nodes quantized "
             f"({', '.join(f'{k} {v}' for k, v in sorted(pl['summary']['by_family'].items()))}), "
             f"{len(pl['kept_float'])} kept fp16; everything else fp16", ""]
    isl = r.get("fp32_island", {})
    if isl.get("nodes"):
        lines[-2] += (f" except the fp32 island: the Performer's linear-attention core ({isl['nodes']} nodes, "
                      f"`{isl['pattern']}`, the same island as the fp16 graph) stays float32 behind Casts. "
                      f"Why: {isl['reason']}.")
    else:
        lines[-2] += "."
    if "accuracy" in r:
        v = r["validation"]
        lines += [f"ONNX Runtime {hw['onnxruntime']} CPU ({hw['cpu']}, {hw['cpu_cores']} cores), "
                  f"{v['images']} labeled images from `{v['data']}`.", ""]
        rows = []
        for k, a in r["accuracy"].items():
            rows.append([k, a["top1"], a["top5"], a.get("top1_drop", 0.0) if k != "fp32" else "-",
                         a.get("top1_agreement", "-"), a.get("mean_abs_dlogit", "-"), a.get("max_abs_dlogit", "-")])
        lines += [markdown_table(["graph", "top-1 %", "top-5 %", "top-1 drop", "top-1 agreement with fp32 %",
                                  "mean abs dlogit", "max abs dlogit"], rows), ""]
        p = r["primary"]
        lines += [f"`{Path(p['graph']).name}` ({p['method']}): top-1 drop {p['top1_drop']:.2f} points, "
                  f"threshold {r['max_drop']}: **{'PASS' if p['passed'] else 'FAIL'}**", ""]
    if "sensitivity" in r:
        s = r["sensitivity"]
        lines += [f"## Sensitivity (one {s['grouping']} quantized at a time, {s['method']} ranges)", ""]
        rows = [[g, v["nodes"], v["top1"], v["top1_drop"], v["top1_agreement"]] for g, v in s["groups"].items()]
        lines += [markdown_table([s["grouping"], "nodes", "top-1 %", "top-1 drop", "agreement %"], rows), ""]
    lines += ["Q/DQ checks (TensorRT pattern): " + "; ".join(
        f"{m}: {i['qdq_check']['weight_dq']} per-channel int8 weights, {i['qdq_check']['activation_qdq']} "
        f"per-tensor activation Q/DQ" for m, i in r["int8"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from t2t_vit.data import DataError

    from .policy import PolicyError
    from .quantize import QuantizationError

    try:
        run(args)
    except AccuracyDropError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except (CalibrationError, DataError, PolicyError, QuantizationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
