"""Which layer diverged: every intermediate tensor of a reduced-precision graph against the fp32 graph.

``make layers PRECISION=int8 CHECKPOINT=... DATA=...`` (``python -m evaluation.layerwise``) is the
project's form of ``polygraphy run model.onnx --onnxrt --onnx-outputs mark all``, for when ``make parity``
fails: on N real images (the model's own preprocessing, read from the fp32 graph's metadata) it runs

* the fp32 graph ``<out>/<model>.fp32.onnx`` (the reference) and
* the candidate ``<out>/<model>.<precision>.onnx`` (fp16, int8, int8-cpu or fp8) with Polygraphy's ONNX
  Runtime runner (on the fp8 graph an emulation: :data:`t2t_vit.backends.FP8_EMULATION`), and, where TensorRT
  and a GPU exist, the candidate's TensorRT engine built by Polygraphy's TensorRT loaders (strongly typed,
  every tensor marked as an output; for a graph that records a minimum compute capability, fp8's SM 8.9,
  only on a GPU that has it),

marks every tensor the two graphs share as an output, compares them with Polygraphy's comparator
(``SimpleCompareFunc``: max absolute and relative differences) and adds the error relative to the
reference tensor's own scale (``max|cand - ref| / max|ref|``), the number that says whether a layer is
wrong whatever its magnitude. Tensors are mapped back to the model's modules from the exporter's
name scopes (``/blocks.3/attn/qkv/MatMul_output_0`` -> ``blocks.3.attn.qkv``) and ordered by depth (the
fp32 graph's topological order). The report names the first tensor, and its module, whose relative
error passes ``--tolerance``: where to look first.

Writes ``<out>/layers-<model>-<precision>.{json,md,png}`` (the plot: relative error by depth, one
line per runner, the tolerance and the first bad layer marked). Exit code 1 when a layer passes the
tolerance, 0 when none does, 2 on bad input.
"""
from __future__ import annotations

import argparse
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from calibration.policy import PolicyError, performer_core_nodes
from engines.backends import capability_shortfall, required_compute_capability
from engines.build import BuildSettings, build_serialized_engine, profile_shapes
from engines.trt_compat import gpu_info
from engines.trt_runtime import TensorRTRunner
from t2t_vit.artifacts import default_out, onnx_path
from t2t_vit.backends import BackendSpec
from t2t_vit.cli import add_run_args, add_stage_args, apply_threads, run_command
from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset, imagenette_root, scan_image_folder
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, file_sha256
from t2t_vit.graphs import GraphError, expect_graph, graph_inputs, recorded_checkpoint, value_types
from t2t_vit.reports import host_line, markdown_table, pyplot, report_header, write_report

_logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOLERANCE", "tensor_module", "shared_tensors", "compare_layers", "get_args_parser", "main"]

# Relative error (max|cand - ref| / max|ref|) above which a tensor counts as diverged, per precision.
# fp16 keeps 11 significant bits (2^-11 = 5e-4 per rounding); int8 keeps 8 bits per quantized input. fp8 (E4M3)
# keeps 4 significant bits: each quantized operand is off by up to 2^-4 of itself, so a product of two is off by
# up to about 2 * 2^-4 = 0.125 (first order); docs/fp8.md has the measurement beside int8's.
DEFAULT_TOLERANCE = {"fp16": 1e-2, "int8": 1e-1, "int8-cpu": 1e-1, "fp8": 1.25e-1}
_SCOPE = re.compile(r"^/(?:model/)?(?P<scope>.*)/[^/]+$")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def canonical(name: str) -> str:
    """A tensor name without the wrapper scope the fp16 export adds (``/model/...`` -> ``/...``)."""
    return "/" + name[len("/model/"):] if name.startswith("/model/") else name


def tensor_module(name: str) -> str:
    """The dotted module path a tensor's name scope encodes, or ``"(graph)"`` when it carries none."""
    m = _SCOPE.match(canonical(name))
    if not m or not m.group("scope"):
        return "(graph)"
    return m.group("scope").replace("/", ".")


def _node_outputs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor, op type of its producer) for every node output, in graph (topological) order."""
    return [(o, n.op_type) for n in model.graph.node for o in n.output if o]


def shared_tensors(ref: onnx.ModelProto, cand: onnx.ModelProto) -> list[dict[str, Any]]:
    """Float tensors both graphs compute (matched by canonical name and rank), in the reference's order."""
    ref_types, cand_types = value_types(ref), value_types(cand)
    ref_ranks = _ranks(ref)
    cand_ranks = _ranks(cand)
    cand_outputs = _node_outputs(cand)
    counts: dict[str, int] = {}
    for t, _ in cand_outputs:
        counts[canonical(t)] = counts.get(canonical(t), 0) + 1
    # A canonical name two tensors share (the wrapper's own /Cast_output_0 next to /model/Cast_output_0) is
    # ambiguous: left out rather than guessed.
    cand_by_name = {canonical(t): (t, op) for t, op in cand_outputs if counts[canonical(t)] == 1}
    cand_names = {t for t, _ in cand_outputs}
    out = []
    for t, op in _node_outputs(ref):
        match = cand_by_name.get(canonical(t))
        if match is None or ref_types.get(t) not in _FLOATS or cand_types.get(match[0]) not in _FLOATS:
            continue
        if ref_ranks.get(t) != cand_ranks.get(match[0]):
            continue
        if t != match[0] and t in cand_names:  # renaming would clash with another tensor of the candidate
            continue
        out.append({"tensor": t, "candidate_tensor": match[0], "op": op, "module": tensor_module(t)})
    return out


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
            list(inferred.graph.value_info) + list(inferred.graph.output)}


def _rename_tensors(model: onnx.ModelProto, mapping: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` whose tensors are renamed (so Polygraphy compares them by name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        for i, t in enumerate(node.input):
            node.input[i] = mapping.get(t, t)
        for i, t in enumerate(node.output):
            node.output[i] = mapping.get(t, t)
    for vi in list(out.graph.value_info) + list(out.graph.output):
        vi.name = mapping.get(vi.name, vi.name)
    return out


def _runners(ref: onnx.ModelProto, cand: onnx.ModelProto, names: list[str], precision: str, cand_path: Path,
             tensorrt: bool, batch_size: int = 8) -> tuple[list[Any], str]:
    """Polygraphy runners: fp32 and the candidate on ONNX Runtime CPU, plus TensorRT when asked and available."""
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    def ort(model: onnx.ModelProto, name: str):
        marked = ModifyOutputs(model, outputs=names, copy=True)()
        return OnnxrtRunner(SessionFromOnnx(marked.SerializeToString(), providers=["cpu"]), name=name)

    runners = [ort(ref, "onnxruntime-cpu-fp32"), ort(cand, f"onnxruntime-cpu-{precision}")]
    why = ""
    if tensorrt:
        ok, why = TensorRTRunner.availability()
        need = required_compute_capability({p.key: p.value for p in cand.metadata_props})
        if ok and need:  # an fp8 graph builds only for an SM 8.9+ GPU
            why = capability_shortfall(need, gpu_info(), what=f"{cand_path} (a TensorRT {precision} graph)")
            ok = not why
        if ok:
            # The project's one engine build (engines.build), for batches of 1..batch_size, every tensor marked an
            # output (tensors TensorRT fuses away are reported as not compared). Built from the renamed candidate,
            # as ONNX Runtime runs it, so TensorRT's outputs carry the names the comparison looks up.
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            settings = BuildSettings(min_batch=1, opt_batch=batch_size, max_batch=batch_size)
            with tempfile.TemporaryDirectory() as tmp:
                renamed = Path(tmp) / cand_path.name
                onnx.save(cand, str(renamed))
                built = build_serialized_engine(renamed, profile_shapes(graph_inputs(renamed), settings), settings,
                                                mark_all_outputs=True)
            runners.append(TrtRunner(EngineFromBytes(built.serialized), name=f"tensorrt-{precision}"))
            why = ""
    return runners, why


def core_internal_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed inside a Performer's linear-attention core and read only inside it.

    Their errors are not the network's: the random features exp(w.x - |x|^2/2) turn a small error of k or
    q into a larger, mostly per-token scale error that the core's normaliser divides out again (a per-query
    factor cancels exactly in y / D). A core is judged at its output, the tensor ``proj`` reads."""
    try:
        core = set(performer_core_nodes(model))
    except PolicyError:
        return set()
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, set()).add(n.name)
    outputs = {o.name for o in model.graph.output}
    return {o for n in model.graph.node if n.name in core for o in n.output
            if o not in outputs and readers.get(o) and readers[o] <= core}


def compare_layers(fp32_path: Path, cand_path: Path, precision: str, images: np.ndarray, tolerance: float,
                   batch_size: int = 8, tensorrt: bool = True, include_core: bool = False) -> dict[str, Any]:
    """Run both graphs (and TensorRT when available) on ``images`` and compare every shared tensor.

    Returns ``{"tensors": [...], "first_bad": {...} | None, "runners": [...], "tensorrt": reason}``, one
    record per tensor in depth order with, per candidate runner, Polygraphy's max/mean absolute and max
    relative difference and the scale-relative error. Tensors inside a Performer core
    (:func:`core_internal_tensors`) are compared and reported but do not count for ``first_bad`` unless
    ``include_core``.
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # the verdicts are ours (scale-relative); keep its log quiet
    ref, cand = onnx.load(str(fp32_path)), onnx.load(str(cand_path))
    for model, path in ((ref, fp32_path), (cand, cand_path)):
        if model.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise GraphError(f"{path} takes a non-float32 input; compare graphs exported with float32 I/O "
                             f"(the default, without --fp16-io)")
    pairs = shared_tensors(ref, cand)
    if not pairs:
        raise GraphError(f"{cand_path} shares no tensor names with {fp32_path}; export both with `make onnx` "
                         f"(and `make calib` for int8/fp8) from the same model")
    cand = _rename_tensors(cand, {p["candidate_tensor"]: p["tensor"] for p in pairs})
    names = [p["tensor"] for p in pairs]
    runners, trt_reason = _runners(ref, cand, names, precision, cand_path, tensorrt, batch_size)
    input_name = ref.graph.input[0].name
    feeds = [{input_name: images[i:i + batch_size].astype(np.float32)} for i in range(0, len(images), batch_size)]
    results = Comparator.run(runners, data_loader=feeds)
    for _, iterations in results:  # Polygraphy's statistics of fp16 arrays overflow: compare in fp32
        for it in iterations:
            for k in list(it.keys()):
                if it[k].dtype == np.float16:
                    it[k] = it[k].astype(np.float32)
    internal = core_internal_tensors(ref)
    compare = SimpleCompareFunc(check_shapes=False, rtol=0.0, atol=0.0, check_error_stat="max")
    accuracy = Comparator.compare_accuracy(results, comparisons=[(0, i) for i in range(1, len(runners))],
                                           compare_func=compare)[0]
    ref_name = runners[0].name
    records = []
    for depth, p in enumerate(pairs):
        rec = {**p, "depth": depth, "by_runner": {}, "inside_performer_core": p["tensor"] in internal}
        ref_arrays = [it[p["tensor"]] for it in results[ref_name] if p["tensor"] in it]
        scale = max(float(np.abs(a.astype(np.float64)).max()) for a in ref_arrays) if ref_arrays else 0.0
        rec["ref_scale"] = scale
        for r in runners[1:]:
            outs = [it[p["tensor"]] if p["tensor"] in it else None for it in results[r.name]]
            if any(o is None for o in outs):
                rec["by_runner"][r.name] = None  # not produced (fused away by TensorRT)
                continue
            err = max(float(np.abs(o.astype(np.float64) - a.astype(np.float64)).max())
                      for o, a in zip(outs, ref_arrays))
            stats = [it_acc[p["tensor"]] for it_acc in accuracy[(ref_name, r.name)] if p["tensor"] in it_acc]
            rec["by_runner"][r.name] = {
                "max_abs": err,
                "relative": err / scale if scale > 0 else (0.0 if err == 0 else float("inf")),
                "polygraphy_max_absdiff": max(s.max_absdiff for s in stats) if stats else None,
                "polygraphy_mean_absdiff": float(np.mean([s.mean_absdiff for s in stats])) if stats else None,
                "polygraphy_max_reldiff": max(s.max_reldiff for s in stats) if stats else None,
            }
        records.append(rec)
    first_bad = {}
    for r in runners[1:]:
        bad = next((rec for rec in records if (include_core or not rec["inside_performer_core"])
                    and (rec["by_runner"].get(r.name) or {}).get("relative", 0) > tolerance), None)
        first_bad[r.name] = None if bad is None else {k: bad[k] for k in ("tensor", "module", "op", "depth")} | {
            "relative": bad["by_runner"][r.name]["relative"]}
    return {"tensors": records, "first_bad": first_bad, "runners": [r.name for r in runners],
            "core_internal": len([r for r in records if r["inside_performer_core"]]), "include_core": include_core,
            "tensorrt": trt_reason or "ran", "compared": len(records),
            "candidate_tensors_total": sum(1 for _ in _node_outputs(cand))}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def _modules_table(result: dict[str, Any], runner: str) -> list[list[Any]]:
    """Per module (in depth order): tensors compared, worst relative error, where it is worst."""
    rows: dict[str, list[Any]] = {}
    for rec in result["tensors"]:
        m = (rec["by_runner"].get(runner) or {})
        if not m:
            continue
        row = rows.setdefault(rec["module"], [rec["module"], 0, 0.0, ""])
        row[1] += 1
        if m["relative"] >= row[2]:
            row[2], row[3] = m["relative"], f"{rec['op']} `{rec['tensor']}`"
    return list(rows.values())


def render_markdown(report: dict[str, Any]) -> str:
    res = report["result"]
    emulation = report.get("emulation")  # fp8: what ONNX Runtime's run of the graph leaves out
    lines = [f"# Layer-wise comparison: {report['model']} {report['precision']} vs fp32", "",
             f"`{report['command']}`", "",
             f"- graphs: `{report['fp32_onnx']}` (reference) and `{report['candidate_onnx']}`",
             f"- images: {report['images']} from `{report['data']}` (the model's preprocessing)",
             f"- tensors compared: {res['compared']} of the candidate's {res['candidate_tensors_total']} "
             f"(those both graphs compute, matched by name)",
             f"- relative error = max|candidate - fp32| / max|fp32| over the images, per tensor; tolerance "
             f"{report['tolerance']:g}",
             f"- TensorRT: {res['tensorrt']}",
             *([f"- onnxruntime-cpu-{report['precision']}: {emulation}"] if emulation else []),
             f"- {res.get('core_internal', 0)} tensors inside Performer cores (random features exp(w.x - |x|^2/2), "
             f"their sums and D) are reported but "
             + ("count for the first bad layer (--include-core)" if res.get("include_core") else
                "judged at the core's output (y / D, what `proj` reads): the features turn a small error of k or q "
                "into scale errors the normaliser divides out; --include-core counts them"),
             f"- host: {host_line(report['host'])}", ""]
    for runner in res["runners"][1:]:
        fb = res["first_bad"].get(runner)
        lines += [f"## {runner}", "",
                  (f"**First tensor past the tolerance: `{fb['tensor']}` ({fb['op']}) in module `{fb['module']}`, "
                   f"depth {fb['depth']}, relative error {fb['relative']:.3g}.**") if fb else
                  f"Every tensor is within the tolerance {report['tolerance']:g}: none exceeds it.", "",
                  markdown_table(["module", "tensors", "worst relative error", "worst at"],
                                 _modules_table(res, runner)), ""]
    lines += [f"![relative error by depth](layers-{report['model']}-{report['precision']}.png)", ""]
    return "\n".join(lines)


def _stage(module: str) -> str | None:
    """The plot's x-axis stage of a module: a T2T attention with the soft split that feeds it, a block,
    the final norm and head; None for graph-level tensors (drawn in the stage before them)."""
    parts = module.split(".")
    if parts[0] == "tokens_to_token" and len(parts) > 1:
        if parts[1].startswith("soft_split"):  # soft_split{i} feeds attention{i+1} (2: the projection)
            i = int(parts[1][len("soft_split"):] or 0)
            return f"T2T attn{i + 1}" if i < 2 else "T2T proj"
        return {"project": "T2T proj"}.get(parts[1], "T2T " + parts[1].replace("attention", "attn"))
    if parts[0] == "blocks" and len(parts) > 1:
        return f"block {parts[1]}"
    if parts[0] in ("norm", "head"):
        return "norm, head"
    return None


def _stage_spans(tensors: Sequence[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage, first depth, last depth) in graph order."""
    spans: list[list[Any]] = []
    for r in tensors:
        stage = _stage(r["module"]) or (spans[-1][0] if spans else "input")
        if spans and spans[-1][0] == stage:
            spans[-1][2] = r["depth"]
        else:
            spans.append([stage, r["depth"], r["depth"]])
    return [tuple(s) for s in spans]


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()

    res = report["result"]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    # Stages as shaded bands with their names under the axis, horizontal (the old per-module ticks overlapped).
    spans = _stage_spans(res["tensors"])
    for i, (stage, lo, hi) in enumerate(spans):
        if i % 2:
            ax.axvspan(lo - 0.5, hi + 0.5, color="#000000", alpha=0.05, lw=0)
    ax.set_xticks([(lo + hi) / 2 for _, lo, hi in spans], [s for s, _, _ in spans], fontsize=8)
    for k, tick in enumerate(ax.get_xticklabels()):  # narrow neighbours alternate between two rows
        tick.set_y(-0.045 * (k % 2))
    for runner in res["runners"][1:]:
        pts = [(r["depth"], max(r["by_runner"][runner]["relative"], 1e-12), r.get("inside_performer_core", False))
               for r in res["tensors"] if (r["by_runner"].get(runner) or {}).get("relative") is not None]
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=4, lw=0.8, label=runner)
        core = [p for p in pts if p[2]]
        if core:
            ax.scatter([p[0] for p in core], [p[1] for p in core], s=28, facecolors="none",
                       edgecolors=line.get_color(), lw=0.9, zorder=3,
                       label=f"{runner}: inside a Performer core ({len(core)}; judged at y/D"
                             + (")" if not res.get("include_core") else ", counted: --include-core)"))
        fb = res["first_bad"].get(runner)
        if fb:
            ax.axvline(fb["depth"], color="#c44e52", ls=":", lw=1)
            ax.annotate(f"first past tolerance: {fb['module']}", (fb["depth"], fb["relative"]), fontsize=8,
                        xytext=(5, 5), textcoords="offset points", color="#c44e52")
    ax.axhline(report["tolerance"], color="gray", ls="--", lw=1, label=f"tolerance {report['tolerance']:g}")
    ax.set_yscale("log")
    ax.set_ylabel("max|candidate - fp32| / max|fp32|")
    ax.set_xlabel("tensors in fp32 graph order, by stage")
    ax.set_title(f"{report['model']}: {report['precision']} vs fp32, {report['images']} images")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _images(data: str | None, config: DataConfig, n: int, seed: int) -> tuple[np.ndarray, str]:
    root = Path(data) if data else ((imagenette_root() or Path("(none)")) / "val")
    if (root / "val").is_dir():
        root = root / "val"
    if not root.is_dir():
        raise T2TError(f"no image folder for the comparison: pass DATA=/path/to/val (ImageFolder) (--data); "
                       f"{root} does not exist")
    samples, _ = scan_image_folder(root)
    subset = class_balanced_subset(samples, n, seed=seed, what="--images (IMAGES=)")
    x, _, _ = ImageBatcher(subset, config, batch_size=max(n, 1)).tensor()
    return x.numpy(), str(root)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compare every intermediate tensor of a fp16/int8/fp8 graph with the fp32 "
                                            "graph (Polygraphy) and name the first layer that diverges",
                                add_help=add_help)
    add_stage_args(p, weights=False, checkpoint_help="the weights come from the ONNX files; if given, both graphs "
                                                     "must record this checkpoint's sha256")
    add_run_args(p, batch_size=8, workers=None, progress=False)
    g = p.add_argument_group("comparison")
    g.add_argument("--precision", default="int8", choices=sorted(DEFAULT_TOLERANCE),
                   help="the candidate graph <out>/<model>.<precision>.onnx (default int8)")
    g.add_argument("--candidate", default=None, help="compare this ONNX file instead of <out>/<model>.<precision>.onnx")
    g.add_argument("--data", default=None, help="ImageFolder of real images (default: the development data's val)")
    g.add_argument("--images", type=int, default=16, help="class-balanced images (default 16)")
    g.add_argument("--tolerance", type=float, default=None,
                   help="relative error that counts as diverged (default: fp16 1e-2, int8 1e-1, fp8 0.125)")
    g.add_argument("--no-tensorrt", action="store_true", help="ONNX Runtime only, even where TensorRT exists")
    g.add_argument("--include-core", action="store_true",
                   help="let tensors inside a Performer core count for the first bad layer (by default a core is "
                        "judged at its output: its random features carry scale errors its normaliser divides out)")
    g.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    apply_threads(args.threads)
    out = Path(args.out) if args.out else default_out(args.model)
    fp32 = onnx_path(out, args.model, "fp32")
    cand = Path(args.candidate) if args.candidate else onnx_path(out, args.model, args.precision)
    # Both graphs are checked before anything runs: the right model and precision, and the candidate made
    # from the fp32 graph's weights (and from --checkpoint's, when given).
    ckpt_sha = file_sha256(args.checkpoint) if args.checkpoint else None
    fp32_meta = expect_graph(fp32, model=args.model, precision="fp32", checkpoint_sha=ckpt_sha,
                             checkpoint=args.checkpoint, out=out)
    expect_graph(cand, model=args.model, precision=args.precision, checkpoint=args.checkpoint, out=out,
                 checkpoint_sha=ckpt_sha if ckpt_sha is not None else recorded_checkpoint(fp32_meta),
                 against="--checkpoint (CHECKPOINT=)" if ckpt_sha is not None else f"the fp32 graph {fp32}")
    config = DataConfig.from_metadata(fp32_meta)
    images, root = _images(args.data, config, args.images, args.seed)
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.precision]
    with OutputLock(out):
        result = compare_layers(fp32, cand, args.precision, images, tolerance, args.batch_size,
                                tensorrt=not args.no_tensorrt, include_core=args.include_core)
        report = {**report_header("evaluation.layerwise", argv), "model": args.model, "precision": args.precision,
                  "fp32_onnx": str(fp32), "candidate_onnx": str(cand), "data": root, "images": int(len(images)),
                  "tolerance": tolerance, "emulation": BackendSpec("onnxruntime", "cpu", args.precision).emulation,
                  "result": result}
        stem = out / f"layers-{args.model}-{args.precision}"
        write_report(stem, report, render_markdown(report), plot(report))
    report["written"] = str(stem) + ".md"
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        report = run(args, argv)
        res = report["result"]
        print(f"compared {res['compared']} tensors on {report['images']} images; report {report['written']}")
        bad = {k: v for k, v in res["first_bad"].items() if v}
        for runner in res["runners"][1:]:
            fb = res["first_bad"].get(runner)
            print(f"  {runner}: " + (f"first past tolerance {report['tolerance']:g}: {fb['module']} ({fb['op']} "
                                      f"{fb['tensor']}), relative error {fb['relative']:.3g}" if fb else "within tolerance"))
        if bad:
            raise ThresholdMissed(f"a tensor exceeds the tolerance {report['tolerance']:g} (see {report['written']})")
        return 0

    return run_command(body, "evaluation.layerwise")


if __name__ == "__main__":
    raise SystemExit(main())
