"""Training-time data: ImageFolder splits, timm train/eval transforms, loaders, an optional decoded-image cache.

The eval side never re-declares preprocessing: it is :meth:`t2t_vit.data.DataConfig.eval_transform`
resolved from the model, the same transform ``train.validate``, calibration and parity use.
Unreadable images are logged and skipped (the batch shrinks), never fatal
(:class:`t2t_vit.data.SkippingDataset`, the dataset every stage uses).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from t2t_vit.data import DataConfig, DataError, Sample, class_balanced_subset, load_image, scan_image_folder

_logger = logging.getLogger(__name__)

__all__ = [
    "resolve_split",
    "build_train_transform",
    "ImageCache",
    "seed_worker",
]

SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}


def resolve_split(root: str | Path, split: str) -> Path:
    """``root/<split>`` of an ImageNet-style tree, with an error that says what layout is expected."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root} (pass --data DIR where DIR holds train/ and val/ "
                        f"in ImageFolder layout: DIR/train/<class>/<image>)")
    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
    raise DataError(f"{root} has no '{split}/' folder (found {present}); expected {root}/{split}/<class>/<image> "
                    f"(ImageFolder layout, e.g. ImageNet synset folders)")


def _posterize_compat(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with the 0-bit case Pillow >= 11 refuses (``bits must be between 1 and 8``).

    RandAugment ``inc1`` at magnitude 10 asks for 0 bits, which older Pillow turned into a black image;
    we keep that meaning instead of crashing a worker in the middle of a run.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


def build_train_transform(cfg: Any, data_config: DataConfig) -> Callable:
    """timm's ImageNet train transform (random-resized crop, flip, RandAugment, random erasing)."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    tf = create_transform(
        input_size=(3, data_config.img_size, data_config.img_size),
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa or None,
        interpolation=cfg.train_interpolation,
        mean=data_config.mean,
        std=data_config.std,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if "Posterize" in op.name:
                    op.aug_fn = _posterize_compat
    return tf


class ImageCache:
    """Every image of a split decoded once and downsized to ``size`` x ``size`` (uint8, in memory).

    On a CPU run at a reduced resolution, decoding 224-px JPEGs and cropping them every epoch costs
    more than the crop itself; the cache trades ~``size*size*3`` bytes per image for that work. The
    random-resized crop and RandAugment still run per sample on the cached image, so augmentation is
    unchanged apart from starting at ``size`` instead of the file's resolution. Unreadable images are
    dropped (logged) when the cache is built.
    """

    def __init__(self, samples: Sequence[Sample], size: int, progress: bool = True):
        from tqdm import tqdm

        arrays, kept = [], []
        it = tqdm(samples, desc=f"cache {size}px", unit="img", disable=not progress, mininterval=2.0)
        for s in it:
            img = load_image(s.path)
            if img is None:
                continue
            # Square resize of the whole image (no crop) keeps everything the random crop may pick.
            arrays.append(np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8))
            kept.append(s)
        if not kept:
            raise DataError("no readable images to cache")
        self.size = size
        self.samples = kept
        self.skipped = len(samples) - len(kept)
        self.images = np.stack(arrays)  # (N, size, size, 3); shared copy-on-write with forked workers

    def __len__(self) -> int:
        return len(self.samples)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from its torch seed (which the loader derives
    from the main process RNG we reseed every epoch), so augmentation is reproducible."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def scan_split(root: Path, class_to_idx: dict[str, int] | None, limit: int | None, seed: int,
               ) -> tuple[list[Sample], list[str]]:
    samples, classes = scan_image_folder(root, class_to_idx)
    if limit is not None:
        samples = class_balanced_subset(samples, limit, seed, what="--limit-train/--limit-val")
    return samples, classes
