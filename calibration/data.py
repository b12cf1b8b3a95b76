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
from t2t_vit.labels import label_space, metadata_class_names

_logger = logging.getLogger(__name__)

__all__ = ["select_samples", "selection_key", "CachedImages", "load_or_preprocess", "folder_label_space"]

CACHE_VERSION = 1  # bump when the cache layout changes


def folder_label_space(metadata: Mapping[str, str], root: str | os.PathLike) -> dict[str, int]:
    """Folder name -> label index of the model an ONNX file holds (:func:`t2t_vit.labels.label_space`
    with the class list and count recorded in its metadata)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    folders = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    n = int(metadata.get("num_classes", 0) or 0) or None
    return label_space(folders, metadata_class_names(metadata), n)[0]


def select_samples(root: str | os.PathLike, n: int | None, seed: int = 0,
                   class_to_idx: Mapping[str, int] | None = None, strict: bool = True,
                   what: str = "the subset size") -> list[Sample]:
    """``n`` images of an ImageFolder tree, class-balanced and deterministic for a given ``seed``.

    Args:
        root: ``root/<class>/<image>`` folder.
        n: how many; None = all.
        seed: selection seed.
        class_to_idx: folder name -> label (see :func:`folder_label_space`).
        strict: raise when the folder holds fewer than ``n`` images (calibration); else take them all.
        what: the user's flag or variable for ``n``, named in errors (``"--calib-size (CALIB_SIZE=)"``).

    Raises:
        DataError: not ImageFolder-shaped, ``n`` not positive, or fewer than ``n`` images with ``strict``.
    """
    samples, classes = scan_image_folder(root, class_to_idx)
    if n is None:
        return samples
    if n > len(samples):
        if strict:
            raise DataError(
                f"{root} holds {len(samples)} images in {len(classes)} class folders, fewer than the "
                f"{n} requested by {what}; lower it to {len(samples)} or point at a larger folder"
            )
        return samples
    return class_balanced_subset(samples, n, seed, what=what)


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
    atomic_torch_save({"key": key, "config": config.as_dict(), "images": images, "labels": labels,
                  "paths": paths, "skipped": list(batcher.skipped)}, path)
    return CachedImages(images, labels, paths, path, False)
