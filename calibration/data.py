"""Calibration and evaluation images: deterministic selection, the model's own preprocessing, a cache.

Selection is :func:`t2t_vit.data.class_balanced_subset` (seeded, round robin over the class folders);
preprocessing is :class:`t2t_vit.data.ImageBatcher` with the :class:`~t2t_vit.data.DataConfig` read
from the fp32 ONNX metadata, the same object evaluation and parity use. The preprocessed tensor is
saved under ``<out>/`` with a name keyed by a hash of (selected paths, data config), so a re-run with
the same selection loads it instead of decoding JPEGs again, and any change of selection or
preprocessing gets a new file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from t2t_vit.data import DataConfig, DataError, ImageBatcher, Sample, class_balanced_subset, scan_image_folder
from t2t_vit.files import atomic_torch_save

_logger = logging.getLogger(__name__)

__all__ = ["select_samples", "selection_key", "CachedImages", "load_or_preprocess", "label_space"]

CACHE_VERSION = 1  # bump when the cache layout changes


def label_space(metadata: Mapping[str, str], root: str | os.PathLike) -> dict[str, int] | None:
    """Folder name -> label index for a model, so labels of a folder match its logits.

    1000-class models use ImageNet's wnid order (Imagenette's synset folders map into it); models that
    recorded ``class_names`` in their metadata use those; otherwise the sorted folder names are the
    classes (torchvision ImageFolder order, as training used) and their count must match.
    """
    num_classes = int(metadata.get("num_classes", 0) or 0)
    if num_classes == 1000:
        from t2t_vit.data import imagenet_wnids

        return {w: i for i, w in enumerate(imagenet_wnids())}
    if metadata.get("class_names"):
        names = json.loads(metadata["class_names"])
        return {n: i for i, n in enumerate(names)}
    root = Path(root)
    if root.is_dir():
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if num_classes and folders and len(folders) != num_classes:
            raise DataError(
                f"{root} has {len(folders)} class folders but the model has {num_classes} classes and its "
                f"metadata records no class names; use a folder with exactly the training classes"
            )
    return None


def select_samples(root: str | os.PathLike, n: int | None, seed: int = 0,
                   class_to_idx: Mapping[str, int] | None = None, strict: bool = True) -> list[Sample]:
    """``n`` images of an ImageFolder tree, class-balanced and deterministic for a given ``seed``.

    Args:
        root: ``root/<class>/<image>`` folder.
        n: how many; None = all.
        seed: selection seed.
        class_to_idx: folder name -> label (see :func:`label_space`).
        strict: raise when the folder holds fewer than ``n`` images (calibration); else take them all.

    Raises:
        DataError: not ImageFolder-shaped, or fewer than ``n`` images with ``strict``.
    """
    samples, classes = scan_image_folder(root, class_to_idx)
    if n is None:
        return samples
    if n > len(samples):
        if strict:
            raise DataError(
                f"{root} holds {len(samples)} images in {len(classes)} class folders, fewer than the "
                f"{n} requested; lower CALIB_SIZE (--calib-size {len(samples)}) or point at a larger folder"
            )
        return samples
    return class_balanced_subset(samples, n, seed)


def selection_key(samples: Sequence[Sample], config: DataConfig) -> str:
    """Short hash of the selected files (path, size, label) and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "config": config.as_dict()}, sort_keys=True).encode())
    for s in samples:
        try:
            size = os.path.getsize(s.path)
        except OSError:
            size = -1
        h.update(f"{s.path}\0{size}\0{s.label}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class CachedImages:
    """Preprocessed images with their labels and paths, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    cache_path: Path
    from_cache: bool


def _save_atomic(obj: dict, path: Path) -> None:
    atomic_torch_save(obj, path)


def load_or_preprocess(samples: Sequence[Sample], config: DataConfig, cache_dir: str | os.PathLike,
                       prefix: str = "calib", batch_size: int = 32, num_workers: int = 0,
                       progress: bool = True) -> CachedImages:
    """The preprocessed tensor of ``samples``: loaded from ``cache_dir`` when cached, else built and cached.

    The file is ``<cache_dir>/<prefix>-<n>-<key>.pt`` with ``key`` from :func:`selection_key`.
    """
    key = selection_key(samples, config)
    path = Path(cache_dir) / f"{prefix}-{len(samples)}-{key}.pt"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("key") == key:
                _logger.info("calibration images loaded from cache %s", path)
                return CachedImages(obj["images"], obj["labels"], list(obj["paths"]), path, True)
        except Exception as e:  # a truncated/corrupt cache is rebuilt, never fatal
            _logger.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
    batcher = ImageBatcher(list(samples), config, batch_size=batch_size, num_workers=num_workers)
    images, labels, paths = batcher.tensor(progress=progress)
    if batcher.skipped:
        _logger.warning("%d unreadable images skipped: %s", len(batcher.skipped), batcher.skipped[:3])
    _save_atomic({"key": key, "config": config.as_dict(), "images": images, "labels": labels,
                  "paths": paths, "skipped": list(batcher.skipped)}, path)
    return CachedImages(images, labels, paths, path, False)
