"""Export a T2T-ViT to TensorRT-friendly, precision-typed ONNX graphs and validate them on ONNX Runtime.

Library API (used by the calibration stage)::

    from export.to_onnx import ExportSettings, export_onnx
    export_onnx(model, "artifacts/t2t_vit_7/t2t_vit_7.fp16.onnx", precision="fp16", metadata=meta,
                settings=ExportSettings(layernorm="fp16"))  # the precision recipe: export/settings.py
    t2t_vit.graphs.read_metadata("artifacts/t2t_vit_7/t2t_vit_7.fp16.onnx")  # -> {"model": "t2t_vit_7", ...}
    ExportSettings.from_metadata(_)  # -> the recipe, as later stages (make calib) read it back
    export_checkpoint("t2t_vit_7", "artifacts/t2t_vit_7", ExportSettings(), checkpoint="best.pth")  # both graphs

Command line (``make onnx MODEL=t2t_vit_7 CHECKPOINT=...``)::

    python -m export.to_onnx --model t2t_vit_7 --checkpoint runs/.../best.pth --out artifacts/t2t_vit_7

writes ``<out>/<model>.fp32.onnx``, ``<out>/<model>.fp16.onnx`` and ``<out>/<model>.export.{json,md}``
(op census, sizes, validation against PyTorch on real images, fp32 tensors kept in the fp16 graph).

Choices (explained in docs/export.md):

* Opset 18. LayerNormalization needs >= 17; 18 is the lowest opset torch 2.14's exporters write natively
  (the dynamo exporter down-converts from 18 when asked for 17), and GELU stays the Erf form every
  TensorRT 10/11 parser imports and fuses, rather than the opset-20 ``Gelu`` function op.
  ``--opset`` accepts 17..23.
* The TorchScript exporter (``dynamo=False``) by default; ``--exporter dynamo`` is the torch.export
  path. After onnxslim both give the same op families within a few nodes (dynamo: one Shape instead of
  a Shape/Gather/Equal/Where chain for the cls-token Expand, 3 Slices instead of a Split per
  attention); the TorchScript path runs 5-10x faster and exports an fp16 model without the fp32
  Cast->Reduce->Cast islands the dynamo path adds (those are removed by
  :func:`export.patterns.remove_reduction_upcasts`). It is deprecated in torch 2.14 (pinned here), so
  both paths are tested and switching is one flag.
* fp16 = the model exported after ``.half()``, wrapped so the graph has explicit ``Cast`` nodes at its
  float32 input and output (``ExportSettings(fp16_io=True)`` drops them). The overflow-safe Performer's constants,
  including its ``torch.finfo(dtype).tiny`` guard, are then fp16 values by construction.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import t2t_vit
from t2t_vit.artifacts import default_out, onnx_path
from t2t_vit.checkpoint import build_model, trained_like_
from t2t_vit.cli import add_run_args, add_stage_args, apply_threads, run_command
from t2t_vit.data import DataConfig
from t2t_vit.errors import ThresholdMissed
from t2t_vit.files import OutputLock, atomic_save_onnx, ensure_dir, file_sha256
from t2t_vit.graphs import check_graph, describe_graph, fp32_tensors, read_metadata, set_metadata
from t2t_vit.reports import host_line, report_header, write_report

from . import patterns as P
from . import validate as V
from .settings import DEFAULT_EXPORTER, DEFAULT_LAYERNORM, DEFAULT_OPSET, EXPORTERS, ExportError, ExportSettings

__all__ = [
    "DEFAULT_OPSET",
    "PRECISIONS",
    "ExportError",
    "ExportSettings",
    "export_onnx",
    "model_metadata",
    "export_model",
    "export_checkpoint",
    "load_model",
    "settings_from_args",
    "get_args_parser",
    "main",
]

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
RANDOM_WEIGHTS_SHA = "none (random weights)"


class _Fp16WithFp32IO(nn.Module):
    """An fp16 model behind float32 I/O: the exported graph starts and ends with an explicit Cast."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float16)).to(torch.float32)


def _project_version() -> str:
    try:
        return version("t2t-vit-deploy")
    except PackageNotFoundError:  # not installed (running from a bare checkout)
        return t2t_vit.__version__


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def model_metadata(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
    """The metadata every exported graph carries: model, num_classes, checkpoint sha256, project
    version and the model's :class:`t2t_vit.data.DataConfig` (so no later stage guesses preprocessing)."""
    meta = {
        "model": _model_name(model),
        "num_classes": str(int(getattr(model, "num_classes", 0))),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else RANDOM_WEIGHTS_SHA,
        "project_version": _project_version(),
        **DataConfig.from_model(model).to_metadata(),
    }
    class_names = (getattr(model, "pretrained_cfg", None) or {}).get("class_names")
    if class_names:
        meta["class_names"] = json.dumps(list(class_names))
    return meta


def _check_writable(path: Path) -> None:
    ensure_dir(path.parent, error=ExportError)
    if path.is_dir():
        raise ExportError(f"output path {path} is a folder; pass a file name ending in .onnx")


def _torch_export(module: nn.Module, example: torch.Tensor, opset: int, exporter: str = DEFAULT_EXPORTER) -> Any:
    """torch.onnx.export with a dynamic batch axis; returns the ModelProto.

    ``torchscript`` (default) is the legacy tracer: deprecated in torch 2.14 but 5-10x faster, and it
    exports an fp16 model without fp32 islands. ``dynamo`` traces with torch.export; after onnxslim the
    two graphs differ by a few shape nodes (see docs/export.md).
    """
    import onnx

    kw = dict(opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The exporters warn and print about their own internals (deprecations, progress lines); the
        # checks in export_onnx decide whether the graph is right.
        warnings.simplefilter("ignore")
        for name in ("onnx_ir", "onnxscript", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (example,), None, dynamo=True, external_data=False,
                                        dynamic_shapes={"x": {0: batch}}, optimize=True, verbose=False, **kw)
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, (example,), buf, dynamo=False, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kw)
        return onnx.load_from_string(buf.getvalue())


def export_onnx(model: nn.Module, path: str | os.PathLike, precision: str = "fp32",
                metadata: Mapping[str, Any] | None = None, settings: ExportSettings | None = None, *,
                check: bool = True) -> Path:
    """Export ``model`` to one precision-typed ONNX graph at ``path`` (written atomically).

    Args:
        model: a T2T-ViT (left untouched: the swaps happen on a copy).
        path: output file; its folder is created.
        precision: "fp32", or "fp16" (fp16 weights and activations; float32 input/output through
            explicit Casts unless ``settings.fp16_io``).
        metadata: extra/overriding ``metadata_props`` (stringified); defaults come from
            :func:`model_metadata` (model name, classes, data config, version; no checkpoint hash).
            ``precision`` and the recipe (:data:`export.settings.METADATA_KEY`) are always set here.
        settings: the precision recipe (:class:`export.settings.ExportSettings`; None: the defaults). Its
            fp16-only fields (``fp32_core``, ``layernorm``, ``fp16_io``) leave an fp32 graph as it is, and are
            recorded in it all the same, for the stages that build reduced-precision graphs from it.
        check: run ``onnx.checker.check_model(full_check=True)`` and the pattern checks (the latter only
            with ``settings.patterns``).

    Returns:
        The path written.
    """
    s = (settings or ExportSettings()).validate()
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r} (int8 graphs come from "
                          f"the calibration stage: make calib)")
    path = Path(path)
    _check_writable(path)
    proto, ref = _export_proto(model, precision, s)
    meta = {**model_metadata(model), **{str(k): str(v) for k, v in (metadata or {}).items()}}
    meta.update(exporter=f"torch.onnx.export(dynamo={s.exporter == 'dynamo'}) torch {torch.__version__}",
                patterns=",".join(P.MODULE_PATTERNS) if s.patterns else "none",
                soft_split=s.soft_split if s.patterns else "unfold",
                last_block="cls-only" if s.cls_only_last_block else "all-tokens", **s.to_metadata())
    # What the graph is (opset, precision, I/O type, fp32 islands, LayerNorm type) is read from the graph
    # itself, so the metadata cannot contradict it.
    meta.update(describe_graph(proto))
    set_metadata(proto, meta)
    proto.producer_name = "t2t-vit-deploy"
    proto.doc_string = f"{meta['model']} {precision} ({meta['patterns']})"
    if check:
        check_graph(proto)
        if s.patterns:
            P.check_patterns(proto, ref)
    atomic_save_onnx(proto, path)
    return path


def _export_proto(model: nn.Module, precision: str, s: ExportSettings) -> tuple[Any, nn.Module]:
    """The ModelProto of ``model`` at ``precision`` after recipe ``s`` (no metadata yet), and the swapped copy
    of the model it was traced from (for the pattern checks)."""
    ref = P.apply_export_patterns(model, patterns=s.patterns, soft_split=s.soft_split)
    if s.cls_only_last_block:
        ref.set_cls_only_last_block(True)
    img_size = int(getattr(ref, "img_size", 224))
    example = torch.randn(2, 3, img_size, img_size)
    module: nn.Module = ref
    if precision == "fp16":
        # The Performer core runs in fp32 inside the fp16 graph (measured to be needed: see patterns).
        ref = P.performer_core_fp32(ref.half(), enable=s.fp32_core)
        ref = P.layernorm_fp32(ref, enable=s.layernorm == "fp32")
        module = ref
        if s.fp16_io:
            example = example.half()
        else:
            module = _Fp16WithFp32IO(ref)
    proto = _torch_export(module, example, int(s.opset), s.exporter)
    if precision == "fp16":
        proto, _ = P.remove_reduction_upcasts(proto)
    if s.simplify:
        proto = P.simplify(proto)
    return proto, ref


# ---------------------------------------------------------------------------------------------------
# The command: export both precisions, validate, report.


def graph_summary(path: Path) -> dict[str, Any]:
    """File size, node count and op census of an exported graph."""
    import onnx

    proto = onnx.load(str(path))
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "file_mib": round(path.stat().st_size / 2**20, 3),
        "nodes": len(proto.graph.node),
        "initializers": len(proto.graph.initializer),
        "op_census": P.op_census(proto),
        "input": _io_desc(proto.graph.input[0]),
        "output": _io_desc(proto.graph.output[0]),
        **{k: v for k, v in {p.key: p.value for p in proto.metadata_props}.items()
           if k in ("precision", "fp32_islands", "layernorm_precision", "opset")},
    }


def _io_desc(vi: Any) -> dict[str, Any]:
    import onnx

    t = vi.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}


def export_model(model: nn.Module, out: Path, settings: ExportSettings | None = None,
                 checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``<out>/<model>.fp32.onnx`` and ``<out>/<model>.fp16.onnx``; returns the graph part of the
    report (sizes, census, fp32 tensors kept in the fp16 graph with reasons). Both graphs are written after
    the one recipe ``settings`` (None: the defaults) and record it."""
    import onnx

    name = _model_name(model)
    meta = model_metadata(model, checkpoint)
    paths = {"fp32": onnx_path(out, name, "fp32"), "fp16": onnx_path(out, name, "fp16")}
    graphs: dict[str, Any] = {}
    for precision, path in paths.items():
        t0 = time.perf_counter()
        export_onnx(model, path, precision=precision, metadata=meta, settings=settings)
        graphs[precision] = {**graph_summary(path), "export_s": round(time.perf_counter() - t0, 2)}
    fp16 = onnx.load(str(paths["fp16"]))
    graphs["fp16"]["fp32_tensors"] = P.fp32_tensor_reasons(fp16, fp32_tensors(fp16))
    # The float32 graph boundary itself, made by explicit Casts (absent with --fp16-io).
    for vi, role in ((fp16.graph.input[0], "graph input"), (fp16.graph.output[0], "graph output")):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            graphs["fp16"]["fp32_tensors"].append({
                "tensor": vi.name, "producer": role,
                "reason": "contract: input float32 / logits float32, converted by an explicit Cast next to it "
                          "(--fp16-io makes it float16)"})
    return graphs


# ----------------------------------------------------------------------------------------------------
# fp16 headroom at the graph's own resolution, from a resolution sweep (make precision-sweep)
# ----------------------------------------------------------------------------------------------------
SWEEP_REPORT = "reports/precision-sweep-{model}.json"
_SWEEP_TEXT = {"fp16_layernorm": "fp16 LayerNorm", "fp16_performer_core": "fp16 Performer core",
               "fp16_graph": "the fp16 graph as exported"}


def sweep_headroom(sweep: str | os.PathLike | Mapping[str, Any], model: str, img_size: int, layernorm: str,
                   fp32_core: bool, checkpoint_sha256: str | None = None) -> dict[str, Any] | None:
    """What a resolution sweep (``evaluation.precision --sweep``) measured for this graph's size.

    Returns ``{"source", "lines", "warnings"}``, or None when the sweep is of another model. ``lines`` state the
    smallest fp16 headroom of the LayerNorms and Performer cores at ``img_size`` and the largest size at which
    each fp16 choice was measured safe; ``warnings`` list every fp16 choice this graph makes (``layernorm``
    "fp16", ``fp32_core`` False, and the graph's own fp16) whose ``img_size`` is past that size, or a size
    beyond the sweep.
    """
    source = "(given)"
    if not isinstance(sweep, Mapping):
        source = str(sweep)
        try:
            sweep = json.loads(Path(sweep).read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"--precision-sweep {source} is not a readable sweep report ({e}); write one with "
                              f"make precision-sweep MODEL={model} CHECKPOINT=...") from e
    if sweep.get("model") != model or not sweep.get("sizes"):
        return None
    sizes = {int(s["img_size"]): s for s in sweep["sizes"]}
    here = sizes.get(int(img_size))
    safe = sweep.get("largest_safe") or {}
    lines = [f"Resolution sweep `{source}` ({sweep.get('weights')} weights{'' if checkpoint_sha256 in (None, sweep.get('checkpoint_sha256')) else ', **other weights than this graph**'}; "
             f"measured at {', '.join(f'{n} px' for n in sorted(sizes))}; safe = headroom >= "
             f"{sweep['criteria']['min_headroom']:g}x and top-1 agreement >= {sweep['criteria']['min_top1_agreement']:g}%)."]
    uses = {"fp16_graph": True, "fp16_layernorm": layernorm == "fp16", "fp16_performer_core": not fp32_core}
    warnings_: list[str] = []
    for choice in ("fp16_layernorm", "fp16_performer_core", "fp16_graph"):
        if choice not in safe:
            continue
        h = (here or {}).get("min_headroom", {}).get(choice)
        measured = (f"headroom at {img_size} px: {h:.3g}x" if h is not None else
                    (f"at {img_size} px: top-1 agreement {next(r['top1_agreement'] for r in here['rows'] if r['variant'].startswith('fp16 graph')):.2f}%"
                     if here else f"not measured at {img_size} px"))
        limit = safe[choice]
        used = "this graph" + (" uses it" if uses[choice] else " does not (fp32 there)")
        lines.append(f"- {_SWEEP_TEXT[choice]}: {measured}; safe up to "
                     f"{f'{limit} px' if limit else 'no size measured'}; {used}.")
        if uses[choice] and (limit is None or img_size > limit):
            warnings_.append(f"{_SWEEP_TEXT[choice]} at {img_size} px is past the largest size measured safe "
                             f"({f'{limit} px' if limit else 'none'}; {source})")
    if img_size > max(sizes):
        warnings_.append(f"{img_size} px is beyond the sweep (measured up to {max(sizes)} px): its fp16 headroom is "
                         f"unknown; run make precision-sweep SWEEP=...,{img_size}")
    return {"source": source, "img_size": int(img_size), "lines": lines, "warnings": warnings_}


def _sweep_for(args: argparse.Namespace, model: str, img_size: int, graphs: Mapping[str, Any],
               checkpoint_sha256: str | None) -> dict[str, Any] | None:
    """The export's sweep statement (--precision-sweep, else reports/precision-sweep-<model>.json if present);
    its warnings go to the log and stderr, loudly."""
    path = args.precision_sweep or SWEEP_REPORT.format(model=model)
    if args.precision_sweep is None and not Path(path).is_file():
        return None
    fp16 = graphs["fp16"]
    res = sweep_headroom(path, model, img_size, fp16.get("layernorm_precision", DEFAULT_LAYERNORM),
                         fp16.get("fp32_islands", "none") != "none", checkpoint_sha256)
    for w in (res or {}).get("warnings", []):
        bar = "!" * 78
        _logger.warning("fp16 headroom: %s", w)
        print(f"\n{bar}\n!! WARNING: {w}\n{bar}", file=sys.stderr)
    return res


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a T2T-ViT to fp32 and fp16 ONNX and validate them on ONNX Runtime",
                                add_help=add_help)
    add_stage_args(p, checkpoint_help="weights to export (default: none, random weights with a warning)")
    add_run_args(p, batch_size=50, workers=None, progress=False)
    g = p.add_argument_group("export")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    g.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER,
                   help=f"torch.onnx exporter (default {DEFAULT_EXPORTER}; see docs/export.md)")
    g.add_argument("--fp16-io", action="store_true", help="fp16 graph takes and returns float16 (default float32 I/O)")
    g.add_argument("--soft-split", choices=P.SOFT_SPLIT_FORMS, default=P.DEFAULT_SOFT_SPLIT,
                   help=f"the soft splits' one-hot Conv: grouped (C*k^4 multiply-adds per pixel) or conv (dense, "
                        f"C^2*k^4) (default {P.DEFAULT_SOFT_SPLIT}; docs/export.md)")
    g.add_argument("--cls-only-last-block", action="store_true",
                   help="the last block computes the class token only (the one the head reads): same logits, "
                        "fewer multiply-adds; for CPU graphs (docs/cpu-speed.md). Default: every block whole")
    g.add_argument("--layernorm-precision", choices=P.LAYERNORM_PRECISIONS, default=None,
                   help=f"the fp16 graph's LayerNorms: fp16, or fp32 behind Casts (default {DEFAULT_LAYERNORM}, "
                        f"chosen from the measured fp16 headroom: docs/export.md)")
    g.add_argument("--data", default=None,
                   help="validation images: an ImageFolder, or a dataset root holding val/ (default: the "
                        "development data's Imagenette val when present)")
    g.add_argument("--val-images", type=int, default=500,
                   help="class-balanced validation images (default 500; 0 skips validation)")
    g.add_argument("--no-fail", action="store_true", help="exit 0 even when validation misses a threshold")
    g.add_argument("--precision-sweep", default=None,
                   help="resolution sweep report whose fp16 headroom the export report states for its own size "
                        "(default: reports/precision-sweep-<model>.json when it exists; make precision-sweep)")
    return p


def _warn_random_weights(name: str) -> None:
    bar = "!" * 78
    msg = (f"\n{bar}\n!! NO --checkpoint: exporting {name} with RANDOM weights. The graphs are only good for\n"
           f"!! testing the pipeline; pass --checkpoint (make onnx CHECKPOINT=...) for a real model.\n{bar}")
    print(msg, file=sys.stderr)  # once: print, not also the logger (which printed the banner a second time)


def settings_from_args(args: argparse.Namespace) -> ExportSettings:
    """The recipe the command line asks for (checked: a bad value is an :class:`ExportError`)."""
    return ExportSettings(opset=args.opset, exporter=args.exporter, soft_split=args.soft_split,
                          cls_only_last_block=args.cls_only_last_block, fp16_io=args.fp16_io,
                          layernorm=args.layernorm_precision or DEFAULT_LAYERNORM).validate()


def load_model(name: str, checkpoint: str | os.PathLike | None = None, img_size: int | None = None,
               weights: str | None = None) -> nn.Module:
    """The model to export, in eval mode. Without a checkpoint: random weights, loudly, made trained-like
    (nonzero biases and LayerNorm affines, so the graphs keep every Add a checkpoint's graph has, instead of
    losing the Adds of zero biases to onnxslim)."""
    model = build_model(name, checkpoint=checkpoint, img_size=img_size, weights=weights).eval()
    if checkpoint is None:
        _warn_random_weights(name)
        trained_like_(model)
    return model


def export_checkpoint(name: str, out: str | os.PathLike, settings: ExportSettings | None = None, *,
                      checkpoint: str | os.PathLike | None = None, img_size: int | None = None,
                      weights: str | None = None) -> dict[str, Any]:
    """``<out>/<name>.fp32.onnx`` and ``.fp16.onnx`` from a checkpoint (or random weights), after ``settings``:
    the library form of ``make onnx --val-images 0`` without its report, for stages that need the graphs
    (calibration). The caller holds ``<out>``'s :class:`t2t_vit.files.OutputLock` if it needs one. Returns
    :func:`export_model`'s graph summaries."""
    model = load_model(name, checkpoint, img_size, weights)
    return export_model(model, Path(out), settings, checkpoint=checkpoint)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything ``main`` does, raising instead of exiting."""
    threads = apply_threads(getattr(args, "threads", None))
    settings = settings_from_args(args)
    model = load_model(args.model, args.checkpoint, args.img_size, getattr(args, "weights", None))
    out = Path(args.out) if args.out else default_out(args.model)
    # Validation images first: a bad --data fails before any graph is written beside the old export report.
    val = V.validation_images(model, args.data, args.val_images) if args.val_images > 0 else None
    t0 = time.perf_counter()
    with OutputLock(out):
        graphs = export_model(model, out, settings, checkpoint=args.checkpoint)
        report: dict[str, Any] = {
            **report_header("export.to_onnx", argv),
            "model": args.model,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "weights": model.pretrained_cfg.get("weights", "random"),
            "metadata": read_metadata(graphs["fp32"]["path"]),
            "opset": args.opset,
            "graphs": graphs,
            "export_s": round(time.perf_counter() - t0, 2),
        }
        if val is not None:
            images, labels, source = val
            with tempfile.TemporaryDirectory(prefix="t2t-export-") as tmp:
                contrasts = {}
                if graphs["fp16"].get("fp32_islands", "none") != "none":
                    # The evidence for the island, on these images: the same fp16 graph without it.
                    contrasts["ORT fp16 without the fp32 island"] = export_onnx(
                        model, Path(tmp) / "no-island.onnx", "fp16", settings=settings.replace(fp32_core=False))
                report["validation"] = V.validate_graphs(model, graphs["fp32"]["path"], graphs["fp16"]["path"],
                                                         images, labels, batch_size=args.batch_size, source=source,
                                                         threads=threads, contrasts=contrasts)
        else:
            report["validation"] = None
        report["precision_sweep"] = _sweep_for(args, args.model, int(model.img_size), graphs,
                                               file_sha256(args.checkpoint) if args.checkpoint else None)
        name = report["metadata"]["model"]
        write_report(out / f"{name}.export", report, render_markdown(report))
    return report


def render_markdown(r: Mapping[str, Any]) -> str:
    g32, g16 = r["graphs"]["fp32"], r["graphs"]["fp16"]
    lines = [f"# ONNX export: {r['model']} ({r['weights']} weights)", "", f"`{r['command']}`", ""]
    if r["weights"] == "random":
        lines += ["**Random weights: no checkpoint was given.** The graphs test the pipeline only.", ""]
    meta = r["metadata"]
    lines += [f"opset {r['opset']}, exporter `{meta.get('exporter')}`, patterns `{meta.get('patterns')}`, "
              f"img_size {meta.get('img_size')}, {meta.get('num_classes')} classes, checkpoint sha256 "
              f"`{meta.get('checkpoint_sha256')}`. fp16 graph: LayerNorm in "
              f"{r['graphs']['fp16'].get('layernorm_precision', '?')}, fp32 islands "
              f"`{r['graphs']['fp16'].get('fp32_islands', '?')}`.", ""]
    lines += ["| graph | file (MiB) | nodes | input | output |", "|---|---:|---:|---|---|"]
    for k, g in (("fp32", g32), ("fp16", g16)):
        lines.append(f"| `{Path(g['path']).name}` | {g['file_mib']:.2f} | {g['nodes']} | "
                     f"{g['input']['dtype']} {g['input']['shape']} | {g['output']['dtype']} {g['output']['shape']} |")
    ops = sorted(set(g32["op_census"]) | set(g16["op_census"]))
    lines += ["", "## Op census", "", "| op | fp32 | fp16 |", "|---|---:|---:|"]
    lines += [f"| {op} | {g32['op_census'].get(op, 0)} | {g16['op_census'].get(op, 0)} |" for op in ops]
    lines += ["", "## fp32 tensors in the fp16 graph", "",
              "One row per reason, with the modules that make those tensors; the JSON report lists every tensor.", ""]
    # reason -> module -> producing ops (each reason stated once, not once per LayerNorm)
    groups: dict[str, dict[str, list[str]]] = {}
    for t in g16.get("fp32_tensors", []):
        where = t["tensor"].rsplit("/", 1)[0] if "/" in t["tensor"] else t["producer"]
        groups.setdefault(t["reason"], {}).setdefault(where, []).append(t["producer"].split(":")[0])
    if groups:
        lines += ["| reason | tensors (by producing op) | where (tensors) |", "|---|---|---|"]
        for reason, modules in groups.items():
            ops = [op for m in modules.values() for op in m]
            counts = ", ".join(f"{op} {n}" for op, n in sorted(Counter(ops).items()))
            where = ", ".join(f"`{m}` ({len(o)})" for m, o in modules.items())
            lines.append(f"| {reason} | {len(ops)}: {counts} | {where} |")
    else:
        lines.append("none")
    v = r.get("validation")
    lines += ["", "## Validation (ONNX Runtime CPU vs PyTorch fp32)", ""]
    if not v:
        lines.append("skipped (--val-images 0)")
    else:
        lines += [f"{v['n_images']} images from {v['source']}; logit scale (max |logit|, PyTorch) "
                  f"{v['logit_scale']:.4g}.", "",
                  "| comparison | max abs dlogit | max dlogit / logit scale | mean abs dlogit | top-1 agreement | threshold | pass |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for c in v["comparisons"]:
            lines.append(f"| {c['name']} | {c['max_abs_dlogit']:.3g} | {c['max_rel_dlogit']:.3g} | "
                         f"{c['mean_abs_dlogit']:.3g} | {c['top1_agreement']:.2f}% | {c.get('threshold', '')} | "
                         f"{'' if c.get('passed') is None else ('yes' if c['passed'] else '**NO**')} |")
        if v.get("labels_top1"):
            lines += ["", "top-1 accuracy against the folder labels: " + ", ".join(
                f"{k} {a:.2f}%" for k, a in v["labels_top1"].items())]
        if v.get("note"):
            lines += ["", v["note"]]
    sw = r.get("precision_sweep")
    if sw:
        lines += ["", f"## fp16 headroom at {sw['img_size']} px", ""]
        lines += [f"**WARNING: {w}.**" for w in sw["warnings"]] + ([""] if sw["warnings"] else [])
        lines += sw["lines"]
    lines += ["", f"Host: {host_line(r['host'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        report = run(args, argv)
        out = Path(args.out) if args.out else default_out(args.model)
        print(f"wrote {report['graphs']['fp32']['path']}, {report['graphs']['fp16']['path']} and "
              f"{out / (report['metadata']['model'] + '.export.md')}")
        v = report.get("validation")
        if v:
            for c in v["comparisons"]:
                print(f"  {c['name']}: max|dlogit| {c['max_abs_dlogit']:.3g} (x{c['max_rel_dlogit']:.2g} of logit "
                      f"scale {v['logit_scale']:.3g}), top-1 agreement {c['top1_agreement']:.2f}%"
                      + ("" if c.get("passed") is None else (" PASS" if c["passed"] else " FAIL")))
            if not v["passed"] and not args.no_fail:
                raise ThresholdMissed("validation missed a threshold (see the report); --no-fail to ignore")
        return 0

    return run_command(body, "export.to_onnx")


if __name__ == "__main__":
    sys.exit(main())
