"""The one preprocessing and batching path shared by validation, calibration, ONNX/TensorRT evaluation
and parity (TensorRT samples' ImageBatcher, timm's resolve_data_config).

* :class:`DataConfig` is resolved from the model's registry entry (never re-declared by a stage) and
  round-trips through ONNX metadata / engine sidecars (:meth:`DataConfig.to_metadata`).
* :func:`scan_image_folder` reads ImageFolder-shaped trees (``root/<class>/<image>``) with clear errors.
* :class:`ImageBatcher` yields ``(images, labels, paths)`` batches of float32 NCHW tensors built with the
  model's eval transform; unreadable images are logged and skipped, never fatal.
* :class:`SkippingDataset` + :func:`skip_collate`: the one dataset that skips unreadable images (the
  batcher above and the training loader both use it).
* :func:`shared_data_root`: where the development data lives (``../shared/data`` beside the checkout, or
  ``$T2T_SHARED_DATA``), for defaults and tests; user data is always passed explicitly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cli import fit_workers
from .errors import T2TError

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = [
    "DataConfig",
    "DataError",
    "shared_data_root",
    "imagenette_root",
    "SkippingDataset",
    "skip_collate",
    "Sample",
    "scan_image_folder",
    "class_balanced_subset",
    "imagenet_wnids",
    "ImageBatcher",
    "load_image",
    "to_rgb",
]


class DataError(T2TError, ValueError):
    """Bad dataset input (missing/empty folders, wrong layout); the message says how to fix it."""


def shared_data_root() -> Path:
    """The development data: ``$T2T_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("T2T_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def imagenette_root() -> Path | None:
    """``<shared data>/imagenette2`` when it holds ``train/`` and ``val/``, else None."""
    root = shared_data_root() / "imagenette2"
    return root if (root / "train").is_dir() and (root / "val").is_dir() else None


@dataclass(frozen=True)
class DataConfig:
    """Everything needed to preprocess an image exactly like the model's eval transform."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    crop_mode: str = "center"

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop: floor(img_size / crop_pct) (248 at 224, 426 at 384)."""
        return int(math.floor(self.img_size / self.crop_pct))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "DataConfig":
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        return cls(
            img_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg["crop_pct"]),
            interpolation=str(cfg["interpolation"]),
            crop_mode=str(cfg.get("crop_mode", "center")),
        )

    def to_metadata(self) -> dict[str, str]:
        """String key/values for ONNX ``metadata_props`` and engine sidecars."""
        return {
            "img_size": str(self.img_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "crop_pct": repr(self.crop_pct),
            "interpolation": self.interpolation,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "DataConfig":
        missing = [k for k in ("img_size", "mean", "std", "crop_pct", "interpolation") if k not in meta]
        if missing:
            raise DataError(
                f"metadata lacks the data config keys {missing}; re-export the ONNX model with `make onnx` "
                f"so preprocessing is recorded instead of guessed"
            )

        def seq(v: Any) -> tuple[float, ...]:
            return tuple(float(x) for x in (json.loads(v) if isinstance(v, str) else v))

        return cls(
            img_size=int(meta["img_size"]),
            mean=seq(meta["mean"]),
            std=seq(meta["std"]),
            crop_pct=float(meta["crop_pct"]),
            interpolation=str(meta["interpolation"]),
            crop_mode=str(meta.get("crop_mode", "center")),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def eval_transform(self):
        """timm's eval transform: bicubic resize to floor(img_size / crop_pct), center crop, normalize."""
        from timm.data import create_transform

        return create_transform(
            input_size=(3, self.img_size, self.img_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            is_training=False,
        )


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # index into the label space of the dataset (or -1 when unknown)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def scan_image_folder(root: str | Path, class_to_idx: Mapping[str, int] | None = None,
                      ) -> tuple[list[Sample], list[str]]:
    """Samples of an ImageFolder tree (``root/<class>/<image>``), sorted, and the class names.

    ``class_to_idx`` maps folder names to label indices (for example ImageNet wnids to the 1000-class
    order); without it, classes are the sorted folder names, indexed from 0.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = (f" It holds {len(loose)} loose images: put them in one sub-folder per class "
                f"(ImageFolder layout), or pass a labels file.") if loose else ""
        raise DataError(f"{root} has no class sub-folders; expected root/<class>/<image>.{hint}")
    classes = [d.name for d in class_dirs]
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(
                f"{root}: class folders {unknown[:5]} are not in the model's class list "
                f"(expected names like {list(class_to_idx)[:3]})"
            )
    mapping = dict(class_to_idx) if class_to_idx is not None else {c: i for i, c in enumerate(classes)}
    samples: list[Sample] = []
    empty = []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        if not files:
            empty.append(d.name)
        samples.extend(Sample(str(p), mapping[d.name]) for p in files)
    if not samples:
        raise DataError(f"{root} has class folders but no images with extensions {IMG_EXTENSIONS}")
    if empty:
        _logger.warning("%s: %d class folders hold no images: %s", root, len(empty), empty[:5])
    return samples, classes


def class_balanced_subset(samples: Sequence[Sample], n: int, seed: int = 0, what: str = "the subset size",
                          ) -> list[Sample]:
    """A deterministic subset of ``n`` samples spread as evenly as possible over the labels.

    Each class is shuffled with ``seed``; classes then take turns (round robin), so the subset is the
    same on every machine and every run, and a larger ``n`` extends a smaller one. ``what`` names the
    user's flag or variable in the error message (e.g. ``"--calib-size (CALIB_SIZE=)"``).
    """
    if n <= 0:
        raise DataError(f"{what} must be a positive number of images, got {n}")
    if n >= len(samples):
        return list(samples)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.path)
        rng.shuffle(group)
        queues.append(group)
    out: list[Sample] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q):
                out.append(q[depth])
                if len(out) == n:
                    break
        depth += 1
    return sorted(out, key=lambda s: (s.label, s.path))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in the standard (sorted) index order, as shipped by timm."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, scaled rather than clipped (docs/training.md, "Images").

    * 16-bit grey (``I;16*``, and ``I``, which Pillow's PNG/PGM readers use for 16-bit files): the high
      byte (v >> 8), as Pillow itself reduces 16-bit RGB files; ``I`` values outside 0..65535 raise.
    * 32-bit float grey (``F``): values in [0, 1] times 255, rounded; any other range raises.
    * Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, premultiplied ``RGBa``):
      composited over white, what a viewer shows, instead of exposing the colour under transparent pixels.
    * Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...): Pillow's conversion.

    Raises:
        ValueError: the mode has no faithful 8-bit RGB form here; the message says why.
    """
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(im)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer pixels span {lo}..{hi}, beyond the 16-bit range; save it as 8- or "
                             f"16-bit")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"float pixels span {np.nanmin(a):.4g}..{np.nanmax(a):.4g}, not 0..1; save it as 8-bit")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str) -> Image.Image | None:
    """Open an image as 8-bit RGB (:func:`to_rgb`), or return None, logged with the reason, when it is
    unreadable, corrupt, of a mode without a faithful RGB form, or larger than Pillow's decompression-bomb
    limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS`` = 179 megapixels, kept as is)."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        _logger.warning("skipping image %s: too large to decode safely (%s)", path, e)
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        _logger.warning("skipping unreadable image %s: %s", path, e)
        return None


class SkippingDataset(torch.utils.data.Dataset):
    """``(transform(image), label, path)`` per sample, or None for an unreadable image (logged).

    ``images``: optional in-memory uint8 (N, H, W, 3) array aligned with ``samples`` (a decoded cache),
    used instead of the files. :func:`skip_collate` drops the None entries and counts them.
    """

    def __init__(self, samples: Sequence[Sample], transform, images: Any = None):
        self.samples = list(samples)
        self.transform = transform
        self.images = images
        if images is not None and len(images) != len(self.samples):
            raise ValueError(f"{len(images)} cached images for {len(self.samples)} samples")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = Image.fromarray(self.images[i]) if self.images is not None else load_image(s.path)
        if img is None:
            return None
        return self.transform(img), s.label, s.path


def skip_collate(items) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str], int]:
    """Stack a batch, dropping unreadable samples: ``(images, labels, paths, number skipped)``; images and
    labels are None when every sample of the batch was unreadable."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return None, None, [], skipped
    images = torch.stack([it[0] for it in kept])
    labels = torch.tensor([it[1] for it in kept], dtype=torch.long)
    return images, labels, [it[2] for it in kept], skipped


@dataclass
class ImageBatcher:
    """Batches of preprocessed images for every evaluator (PyTorch, ONNX Runtime, TensorRT, parity).

    Iterating yields ``(images, labels, paths)`` with ``images`` a float32 (N, 3, S, S) tensor. Batches
    keep the sample order, so two backends fed by two iterations see exactly the same inputs. A last
    partial batch is returned as is (never padded); unreadable images are skipped and counted in
    ``skipped``.
    """

    samples: Sequence[Sample]
    config: DataConfig
    batch_size: int = 32
    num_workers: int = 0
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self.skipped = []
        ds = SkippingDataset(self.samples, self.config.eval_transform())
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=fit_workers(self.num_workers),
            collate_fn=skip_collate,
        )
        seen = 0
        for images, labels, paths, n_skipped in loader:
            if n_skipped:
                chunk = self.samples[seen: seen + self.batch_size]
                kept = set(paths)
                self.skipped.extend(s.path for s in chunk if s.path not in kept)
            seen += self.batch_size
            if images is not None:
                yield images, labels, paths

    def tensor(self, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """All batches concatenated (for calibration caches and small evaluations)."""
        it: Any = iter(self)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(self), desc="preprocess", unit="batch")
        xs, ys, ps = [], [], []
        for x, y, p in it:
            xs.append(x)
            ys.append(y)
            ps.extend(p)
        if not xs:
            raise DataError("no readable images in the selection")
        return torch.cat(xs), torch.cat(ys), ps
