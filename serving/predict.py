"""Top-k classes of image files through a built artifact: the same runners and data config parity uses.

::

    python -m serving.predict --artifact artifacts/t2t_vit_7/t2t_vit_7.fp32.onnx --images a.jpg,b.png
    make predict MODEL=t2t_vit_7 ARTIFACT=artifacts/t2t_vit_7/t2t_vit_7.int8.onnx IMAGES=photos/ ARGS=--json

``--artifact`` is an ONNX graph (ONNX Runtime, preprocessing from its metadata), a TensorRT engine
(preprocessing from its sidecar) or a checkpoint (PyTorch fp32, preprocessing from the model's registry
entry; needs ``--model``). ``--images`` takes comma-separated files and folders (a folder: every image
under it, sorted). Unreadable or missing images are reported one line each and the rest are still
classified; the exit code is then 2 (bad input), after every result is printed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engines.backends import artifact_runner
from t2t_vit.checkpoint import build_model
from t2t_vit.cli import add_run_args, apply_threads, comma_list, parse_and_run
from t2t_vit.data import IMG_EXTENSIONS, DataConfig, load_image
from t2t_vit.errors import T2TError
from t2t_vit.files import atomic_write_json
from t2t_vit.labels import metadata_class_names, model_class_names
from t2t_vit.runners import Runner, TorchRunner

__all__ = ["PredictError", "Classifier", "load_classifier", "expand_images", "class_label", "topk",
           "predict", "get_args_parser", "main"]

TOOL = "serving.predict"


class PredictError(T2TError, ValueError):
    """Bad input to predict (artifact, model, image list); the message says how to fix it."""


@dataclass
class Classifier:
    """A runner with the preprocessing and class list its artifact records."""

    runner: Runner
    data_config: DataConfig
    class_names: list[str] | None
    model: str
    artifact: str
    kind: str  # onnx | engine | checkpoint

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "artifact": self.artifact, "kind": self.kind, "backend": self.runner.name,
                "data_config": self.data_config.as_dict()}


def _check_model(recorded: str | None, model: str | None, artifact: Path) -> str:
    if model and recorded and recorded != model:
        raise PredictError(f"{artifact} was exported from {recorded}, not MODEL={model} (--model); "
                           f"pass MODEL={recorded} or the artifact of {model}")
    return recorded or model or "unknown"


def load_classifier(artifact: str | os.PathLike, model: str | None = None, *, threads: int | None = None,
                    img_size: int | None = None, weights: str | None = None,
                    spinning: bool | None = None) -> Classifier:
    """The runner for an ``.onnx`` graph, an ``.engine`` or a checkpoint, with its own data config
    (``threads``, ``spinning``: ONNX Runtime's, :class:`~t2t_vit.runners.OnnxRuntimeRunner`).

    Raises:
        PredictError: the artifact is missing, or a checkpoint without ``model``, or a model mismatch.
    """
    path = Path(artifact)
    if not path.is_file():
        raise PredictError(f"artifact not found: {path} (ARTIFACT= / --artifact: an .onnx from `make onnx`, an "
                           f".engine from `make engine`, or a checkpoint)")
    if path.suffix == ".onnx":
        runner = artifact_runner(path, threads=threads, spinning=spinning)
        meta = runner.metadata
        name = _check_model(meta.get("model"), model, path)
        return Classifier(runner, runner.data_config, metadata_class_names(meta), name, str(path), "onnx")
    if path.suffix == ".engine":
        trt_runner = artifact_runner(path)
        meta = dict(trt_runner.sidecar.get("onnx_metadata") or {})
        name = _check_model(str(trt_runner.sidecar.get("model") or "") or None, model, path)
        return Classifier(trt_runner, trt_runner.data_config, metadata_class_names(meta), name, str(path), "engine")
    if not model:
        raise PredictError(f"{path} is a checkpoint: say which architecture it holds with MODEL= (--model), "
                           f"e.g. MODEL=t2t_vit_7")
    net = build_model(model, checkpoint=path, img_size=img_size, weights=weights).eval()
    return Classifier(TorchRunner(net), DataConfig.from_model(net), model_class_names(net), model, str(path),
                      "checkpoint")


def expand_images(items: Sequence[str]) -> list[Path]:
    """Files as given (missing ones too: they are reported per file) and every image under each folder.

    Raises:
        PredictError: no item at all, or a folder without images.
    """
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not f.name.startswith("."))
            if not found:
                raise PredictError(f"IMAGES= (--images): folder {p} holds no images with extensions {IMG_EXTENSIONS}")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise PredictError("IMAGES= (--images) is empty: pass image files and/or folders, comma-separated, "
                           "e.g. IMAGES=a.jpg,b.png or IMAGES=photos/")
    return out


def class_label(index: int, class_names: Sequence[str] | None) -> tuple[str, str]:
    """``(class name, human label)``: the recorded class (an ImageNet wnid or folder name) and, for a
    wnid, its ImageNet description (timm's ImageNetInfo); without a class list the index itself."""
    if not class_names or index >= len(class_names):
        return str(index), str(index)
    name = str(class_names[index])
    return name, _imagenet_descriptions().get(name, name)


@functools.lru_cache(maxsize=1)
def _imagenet_descriptions() -> dict[str, str]:
    """ImageNet wnid -> description (timm's ImageNetInfo), read once."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {w: info.label_name_to_description(w) for w in info.label_names()}


def topk(logits: np.ndarray, k: int, class_names: Sequence[str] | None) -> list[list[dict[str, Any]]]:
    """Per row: the ``k`` most probable classes (softmax of the logits), most probable first."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    k = min(k, p.shape[1])
    rows = []
    for probs in p:
        idx = np.argsort(-probs, kind="stable")[:k]
        row = []
        for i in idx:
            name, label = class_label(int(i), class_names)
            row.append({"index": int(i), "class": name, "label": label, "probability": float(probs[i])})
        rows.append(row)
    return rows


@dataclass
class Predictions:
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def _decode(paths: Sequence[Path], transform: Any, out: Predictions) -> tuple[list[Path], list[torch.Tensor]]:
    kept, tensors = [], []
    for p in paths:
        if not p.is_file():
            out.errors.append({"path": str(p), "error": "file not found"})
            continue
        img = load_image(str(p))
        if img is None:
            out.errors.append({"path": str(p), "error": "not a readable image (corrupt or not an image format)"})
            continue
        kept.append(p)
        tensors.append(transform(img))
    return kept, tensors


def predict(clf: Classifier, paths: Sequence[Path], k: int = 5, batch_size: int = 8) -> Predictions:
    """Top-``k`` of every readable image; unreadable ones land in ``errors`` (the rest still run)."""
    out = Predictions()
    transform = clf.data_config.eval_transform()
    with clf.runner:
        for start in range(0, len(paths), batch_size):
            kept, tensors = _decode(paths[start:start + batch_size], transform, out)
            if not tensors:
                continue
            logits = clf.runner.infer(torch.stack(tensors))
            for p, row in zip(kept, topk(logits, k, clf.class_names)):
                out.results.append({"path": str(p), "top": row})
    return out


def render_text(preds: Predictions) -> str:
    lines = []
    for r in preds.results:
        lines.append(r["path"])
        lines.extend(f"  {t['probability']:7.4f}  {t['index']:>4}  {t['label']}" for t in r["top"])
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("serving.predict", add_help=add_help,
                                description="Top-k classes of images through an ONNX graph, engine or checkpoint.")
    p.add_argument("--artifact", required=True, help="an .onnx graph, an .engine (with its sidecar) or a checkpoint")
    p.add_argument("--images", required=True, type=comma_list(), help="comma-separated image files and/or folders")
    p.add_argument("--model", default=None, help="registered model name: required for a checkpoint, checked "
                                                 "against an ONNX graph's or engine's recorded model")
    p.add_argument("--img-size", type=int, default=None, help="checkpoints only: input size (default: the checkpoint's)")
    p.add_argument("--weights", choices=("ema", "model"), default=None, help="checkpoints only: EMA or raw weights")
    p.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--output", default=None, help="also write the JSON to this file (atomically)")
    add_run_args(p, batch_size=8, workers=None, progress=False)
    return p


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise PredictError(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, got {args.batch_size}")
    paths = expand_images(args.images)
    threads = apply_threads(args.threads)
    clf = load_classifier(args.artifact, args.model, threads=threads, img_size=args.img_size, weights=args.weights)
    preds = predict(clf, paths, k=args.top, batch_size=args.batch_size)
    doc = {**clf.describe(), "results": preds.results, "errors": preds.errors}
    if args.output:
        atomic_write_json(args.output, doc)
    print(json.dumps(doc, indent=2) if args.json else render_text(preds))
    for e in preds.errors:
        print(f"{TOOL}: error: {e['path']}: {e['error']}", file=sys.stderr)
    if preds.errors:
        raise PredictError(f"{len(preds.errors)} of {len(paths)} images could not be read (listed above); "
                           f"the other {len(preds.results)} were classified")
    return 0


def main(argv: list[str] | None = None) -> int:
    return parse_and_run(get_args_parser, run, TOOL, argv)


if __name__ == "__main__":
    sys.exit(main())
