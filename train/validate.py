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
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from t2t_vit.data import DataConfig, DataError, ImageBatcher, class_balanced_subset, imagenet_wnids, scan_image_folder

_logger = logging.getLogger("validate")

SPLIT_FOLDERS = ("val", "validation")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-1/top-5 of a T2T-ViT checkpoint on an ImageFolder split",
                                add_help=add_help)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--checkpoint", default=None, help="checkpoint (omit only to time random weights)")
    p.add_argument("--data", required=True, help="ImageFolder split (root/<class>/<image>), or a root holding val/")
    p.add_argument("--img-size", type=int, default=None, help="default: checkpoint / registry size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="class-balanced subset of N images")
    p.add_argument("--weights", choices=("ema", "model"), default=None,
                   help="EMA or raw weights (default: the checkpoint's record of the better one, else EMA)")
    p.add_argument("--no-ema", dest="weights", action="store_const", const="model", help="same as --weights model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="report folder (default artifacts/<model>)")
    return p


def label_space(model: torch.nn.Module, folders: list[str]) -> tuple[dict[str, int], str]:
    """Map folder names to head indices, and say which rule was used."""
    num_classes = int(model.num_classes)
    class_names = (getattr(model, "pretrained_cfg", None) or {}).get("class_names")
    if class_names:
        if len(class_names) != num_classes:
            raise DataError(f"checkpoint meta lists {len(class_names)} class names for a {num_classes}-class head")
        return {c: i for i, c in enumerate(class_names)}, "checkpoint class_names"
    if num_classes == 1000:
        wnids = imagenet_wnids()
        if not all(f in set(wnids) for f in folders):
            bad = [f for f in folders if f not in set(wnids)][:5]
            raise DataError(f"a 1000-class model needs ImageNet synset folders (like n01440764); found {bad}")
        return {w: i for i, w in enumerate(wnids)}, "imagenet-1k wnids"
    if len(folders) != num_classes:
        raise DataError(
            f"class count mismatch: the model head has {num_classes} classes but the data has {len(folders)} "
            f"class folders, and the checkpoint carries no class names to map them. Point --data at the split "
            f"the model was trained on, or fine-tune it: python -m train.train --finetune CKPT --num-classes {len(folders)}")
    return {c: i for i, c in enumerate(folders)}, "sorted folder names"


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


def hardware() -> dict[str, Any]:
    """The host description of every report (t2t_vit.env.host_info), with the GPU as a plain name."""
    from t2t_vit.env import host_info

    info = host_info()
    info["gpu"] = info["gpu"]["name"] if info["gpu"] else None
    return info


def validate(model: torch.nn.Module, val_dir: Path, batch_size: int = 64, workers: int = 2,
             limit: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Top-1/top-5 (%) of ``model`` on ``val_dir`` with the model's eval transform (ImageBatcher)."""
    folders = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_to_idx, rule = label_space(model, folders)
    samples, classes = scan_image_folder(val_dir, class_to_idx)
    if limit:
        samples = class_balanced_subset(samples, limit)
    config = DataConfig.from_model(model)
    batcher = ImageBatcher(samples, config, batch_size=batch_size, num_workers=workers)
    model.eval().to(device)
    c1 = c5 = n = 0
    from tqdm import tqdm

    t0 = time.time()
    with torch.no_grad():
        for x, y, _ in tqdm(batcher, total=len(batcher), desc="validate", unit="batch"):
            logits = model(x.to(device)).float().cpu()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top.eq(y[:, None])
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(1).sum())
            n += len(y)
    if n == 0:
        raise DataError(f"no readable images in {val_dir}")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": n, "skipped": list(batcher.skipped),
            "classes": len(classes), "label_mapping": rule, "data_config": config.as_dict(),
            "seconds": round(time.time() - t0, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from t2t_vit.checkpoint import CheckpointError, build_model, file_sha256

    try:
        if args.checkpoint is None:
            _logger.warning("NO --checkpoint: scoring RANDOM weights (the numbers mean nothing)")
        model = build_model(args.model, args.checkpoint, img_size=args.img_size, weights=args.weights)
        val_dir = resolve_val_dir(args.data)
        res = validate(model, val_dir, args.batch_size, args.workers, args.limit, args.device)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"model": args.model, "checkpoint": args.checkpoint,
              "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
              "weights": model.pretrained_cfg.get("weights", "random"), "data": str(val_dir),
              "img_size": int(model.img_size), "num_classes": int(model.num_classes), **res, "hardware": hardware()}
    out = Path(args.out or os.path.join("artifacts", args.model))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"validate-{val_dir.parent.name}-{val_dir.name}" if val_dir.parent.name else f"validate-{val_dir.name}"
    from t2t_vit.files import atomic_write_text

    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    md = (f"# {args.model} on {val_dir}\n\n| checkpoint | img | images | top-1 | top-5 | labels |\n|---|---|---|---|---|---|\n"
          f"| {args.checkpoint} | {report['img_size']} | {res['images']} | {res['top1']:.2f} | {res['top5']:.2f} | "
          f"{res['label_mapping']} |\n")
    if res["skipped"]:
        md += f"\n{len(res['skipped'])} unreadable images skipped: {', '.join(res['skipped'][:5])}\n"
    atomic_write_text(out / f"{stem}.md", md)
    print(f"{args.model}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  on {res['images']} images "
          f"({res['label_mapping']}); report {out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
