"""Top-1 / top-5 of a checkpoint on an ImageFolder split, with the model's own eval transform.

    python -m train.validate --model t2t_vit_7 --checkpoint runs/imagenette-t2t_vit_7/best.pth \
        --data ../shared/data/imagenette2/val

Labels: a checkpoint trained here carries its ``class_names`` (meta), so folders are mapped onto
them (a model trained on a subset of classes); a 1000-class model is scored on ImageNet synset
folders through the standard ImageNet-1k order (``imagenet_wnids()``), so it can be evaluated on
any ImageNet subset such as Imagenette (top-1 stays an argmax over all 1000 classes); otherwise
sorted folder names must match the head size. Results go to ``<out>/validate-<split>.{json,md}``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from t2t_vit.artifacts import default_out
from t2t_vit.checkpoint import build_model
from t2t_vit.cli import add_limit_arg, add_run_args, add_stage_args, apply_threads, run_command
from t2t_vit.data import DataConfig, DataError, ImageBatcher, class_balanced_subset, scan_image_folder
from t2t_vit.files import OutputLock, file_sha256
from t2t_vit.labels import label_space, model_class_names, readable_class
from t2t_vit.metrics import LogitStats
from t2t_vit.reports import host_line, report_header, write_report

_logger = logging.getLogger("validate")

SPLIT_FOLDERS = ("val", "validation")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-1/top-5 of a T2T-ViT checkpoint on an ImageFolder split",
                                add_help=add_help)
    add_stage_args(p, checkpoint_help="checkpoint (omit only to time random weights)",
                   out_help="report folder (default artifacts/<model>)")
    p.add_argument("--no-ema", dest="weights", action="store_const", const="model", help="same as --weights model")
    add_run_args(p, batch_size=64, workers=2)
    g = p.add_argument_group("validation")
    g.add_argument("--data", required=True, help="ImageFolder split (root/<class>/<image>), or a root holding val/")
    add_limit_arg(g)
    g.add_argument("--device", default="cpu")
    return p


def resolve_val_dir(data: str | Path) -> Path:
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"data folder not found: {data} (pass the val split, e.g. .../imagenette2/val)")
    subdirs = {p.name for p in data.iterdir() if p.is_dir()}
    for name in SPLIT_FOLDERS:
        # A dataset root (train/ + val/) rather than a split: score its val/ split.
        if name in subdirs and subdirs <= {"train", "val", "validation", "test"}:
            return data / name
    return data


def validate(model: torch.nn.Module, val_dir: Path, batch_size: int = 64, workers: int = 2,
             limit: int | None = None, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Top-1/top-5 (%) of ``model`` on ``val_dir`` with the model's eval transform (ImageBatcher)."""
    folders = [p.name for p in val_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    class_to_idx, rule = label_space(folders, model_class_names(model), int(model.num_classes))
    samples, classes = scan_image_folder(val_dir, class_to_idx)
    if limit is not None:
        samples = class_balanced_subset(samples, limit, what="--limit")
    config = DataConfig.from_model(model)
    batcher = ImageBatcher(samples, config, batch_size=batch_size, num_workers=workers)
    model.eval().to(device)
    stats = LogitStats()
    t0 = time.time()
    with torch.no_grad():
        for x, y, _ in tqdm(batcher, total=len(batcher), desc="validate", unit="batch", disable=not progress):
            stats.update(model(x.to(device)).float().cpu().numpy(), y.numpy())
    if stats.n == 0:
        raise DataError(f"no readable images in {val_dir}")
    acc = stats.summary()
    return {"top1": acc["top1"], "top5": acc["top5"], "images": stats.n, "skipped": list(batcher.skipped),
            "classes": len(classes), "class_names": [readable_class(c) for c in classes], "label_mapping": rule, "data_config": config.as_dict(),
            "seconds": round(time.time() - t0, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        apply_threads(args.threads)
        if args.checkpoint is None:
            _logger.warning("NO --checkpoint: scoring RANDOM weights (the numbers mean nothing)")
        model = build_model(args.model, args.checkpoint, img_size=args.img_size, weights=args.weights)
        val_dir = resolve_val_dir(args.data)
        res = validate(model, val_dir, args.batch_size, args.workers, args.limit, args.device,
                       progress=not args.no_progress)
        report = {**report_header("train.validate", argv), "model": args.model, "checkpoint": args.checkpoint,
                  "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
                  "weights": model.pretrained_cfg.get("weights", "random"), "data": str(val_dir),
                  "img_size": int(model.img_size), "num_classes": int(model.num_classes), **res}
        out = Path(args.out) if args.out else default_out(args.model)
        stem = f"validate-{val_dir.parent.name}-{val_dir.name}" if val_dir.parent.name else f"validate-{val_dir.name}"
        md = (f"# {args.model} on {val_dir}\n\n`{report['command']}`\n\n"
              f"| checkpoint | weights | img | images | top-1 | top-5 | labels |\n|---|---|---|---|---|---|---|\n"
              f"| {args.checkpoint} | {report['weights']} | {report['img_size']} | {res['images']} | {res['top1']:.2f} | "
              f"{res['top5']:.2f} | {res['label_mapping']} |\n\nHost: {host_line(report['host'])}.\n")
        shown = res["class_names"][:20]
        md += (f"\nClasses ({res['classes']}): {', '.join(shown)}{' ...' if res['classes'] > len(shown) else ''}\n")
        if res["skipped"]:
            md += f"\n{len(res['skipped'])} unreadable images skipped: {', '.join(res['skipped'][:5])}\n"
        with OutputLock(out):
            write_report(out / stem, report, md)
        print(f"{args.model}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  on {res['images']} images "
              f"({res['label_mapping']}); report {out / stem}.json")
        return 0

    return run_command(body, "train.validate")


if __name__ == "__main__":
    raise SystemExit(main())
