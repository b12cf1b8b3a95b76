"""Label spaces: which class index a folder or a label file means for a given model, in one place.

:func:`label_space` maps class folders onto a model's indices, the one rule every stage uses (training
checkpoints carry their ``class_names``; a 1000-class model uses the ImageNet-1k order; otherwise the
sorted folder names, whose count must equal the head size). :func:`resolve_eval_set` finds and labels
an evaluation set in the layouts ImageNet users have:

* Synset folders (``val/n01440764/ILSVRC2012_val_00000293.JPEG``), the ImageFolder layout.
* A flat folder of ``ILSVRC2012_val_*.JPEG`` plus a ground-truth file: Kaggle's
  ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first token is the wnid) or a plain
  ``filename label`` list with 0-based indices (a wnid in place of the index works too).

Labels always index the MODEL's classes: a 1000-class model uses the standard ImageNet-1k order
(:func:`t2t_vit.data.imagenet_wnids`, shipped by timm), so a subset such as Imagenette's 10 synset
folders maps onto the 1000-class indices; a model trained on a subset uses the ``class_names`` its
checkpoint carries.
"""
from __future__ import annotations

import csv
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .data import IMG_EXTENSIONS, DataError, Sample, imagenet_wnids, scan_image_folder

_logger = logging.getLogger(__name__)

__all__ = ["EvalSet", "model_class_names", "metadata_class_names", "label_space", "read_labels_file",
           "resolve_eval_set", "one_based_suspicions", "shifted_label_check", "imagenet_class_names",
           "readable_class"]


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> dict[str, str]:
    """ImageNet-1k wnid -> readable name ("n01440764" -> "tench"), the 1000 names torchvision's weights
    metadata carries (no download; the two duplicated WordNet names come disambiguated: "crane bird" and
    "crane", "maillot tank suit" and "maillot")."""
    from torchvision.models import ResNet50_Weights

    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    wnids = imagenet_wnids()
    if len(names) != len(wnids):  # a torchvision that changed its list: wnids only, rather than wrong names
        _logger.warning("torchvision lists %d ImageNet class names, not %d: reports show wnids only",
                        len(names), len(wnids))
        return {}
    return dict(zip(wnids, names))


def readable_class(name: str) -> str:
    """A class name for tables: an ImageNet wnid with its readable name ("tench (n01440764)"); any other
    name (a folder of the user's own dataset) as it is."""
    readable = imagenet_class_names().get(name)
    return f"{readable} ({name})" if readable else name


@dataclass
class EvalSet:
    """Samples labelled in the model's class order, plus how they were found."""

    samples: list[Sample]
    class_names: list[str]  # index -> name (wnid, or folder name) in the model's label space
    layout: str  # "folders" or "flat+labels"
    mapping: str  # how folder/file labels were mapped to model indices, for the report
    root: str = ""
    labels_file: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # suspicious labels: said loudly in reports and terminal

    def label_summary(self) -> dict[str, Any]:
        """The labels actually used: range, distinct count, images per class (by class name)."""
        counts: dict[int, int] = {}
        for s in self.samples:
            counts[s.label] = counts.get(s.label, 0) + 1
        name = (lambda i: self.class_names[i] if 0 <= i < len(self.class_names) else str(i))
        return {"min": min(counts) if counts else None, "max": max(counts) if counts else None,
                "distinct": len(counts), "label_0_present": 0 in counts,
                "per_class": {f"{i} {readable_class(name(i))}": n for i, n in sorted(counts.items())}}


def model_class_names(model=None, num_classes: int | None = None) -> list[str] | None:
    """The model's class list: checkpoint ``class_names``, else ImageNet-1k wnids for 1000 classes, else None."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("class_names"):
        return [str(c) for c in cfg["class_names"]]
    if num_classes is None and model is not None:
        num_classes = getattr(model, "num_classes", None)
    if num_classes == 1000:
        return imagenet_wnids()
    return None


def metadata_class_names(meta: Mapping[str, str]) -> list[str] | None:
    """The class list recorded in ONNX metadata / an engine sidecar (``class_names``, else ImageNet-1k
    for 1000 classes), or None."""
    import json

    if meta.get("class_names"):
        return [str(c) for c in json.loads(meta["class_names"])]
    if str(meta.get("num_classes", "")) == "1000":
        return imagenet_wnids()
    return None


def label_space(folders: Sequence[str], class_names: Sequence[str] | None, num_classes: int | None,
                ) -> tuple[dict[str, int], str]:
    """Class folder name -> the model's class index, and a description of the rule used.

    Args:
        folders: the class folder names found in the data.
        class_names: the model's class list (:func:`model_class_names` / :func:`metadata_class_names`),
            or None when the model records none.
        num_classes: the model's head size.

    Raises:
        DataError: a folder that is not one of the model's classes, or (without a class list) a folder
            count that differs from the head size.
    """
    folders = sorted(folders)
    if class_names:
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DataError(f"class folders {unknown[:5]} are not among the model's {len(index)} classes "
                            f"(expected names like {list(index)[:3]}); point at data with the model's classes")
        rule = (f"{len(folders)} folders -> the model's {len(index)}-class list"
                + (" (ImageNet-1k order)" if len(index) == 1000 and class_names[0] == "n01440764" else ""))
        return index, rule
    if num_classes is not None and len(folders) != num_classes:
        raise DataError(
            f"class count mismatch: the model has {num_classes} classes but the data has {len(folders)} class "
            f"folders, and the model records no class names to map them; use the split the model was trained "
            f"on, a checkpoint whose meta holds class_names (this project's training checkpoints do), or "
            f"fine-tune: python -m train.train --finetune CKPT --num-classes {len(folders)}")
    return {c: i for i, c in enumerate(folders)}, f"{len(folders)} folders in sorted order -> indices 0..{len(folders) - 1}"


def _stem(name: str) -> str:
    name = Path(name.strip()).name
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMG_EXTENSIONS else name


def read_labels_file(path: str | Path, class_to_idx: Mapping[str, int] | None) -> dict[str, int]:
    """Ground truth as ``{image stem: model class index}``.

    Args:
        path: Kaggle ``LOC_val_solution.csv`` or a ``filename label`` list (label: 0-based index or wnid).
        class_to_idx: model class name -> index; needed when labels are wnids.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"labels file {path} is empty")

    def to_index(token: str, where: str) -> int:
        token = token.strip()
        if token.lstrip("-").isdigit():
            return int(token)
        if class_to_idx is None:
            raise DataError(f"{where}: label {token!r} is a class name, but the model has no class list to "
                            f"map it to (use a checkpoint whose meta holds class_names, or 0-based indices)")
        if token not in class_to_idx:
            raise DataError(f"{where}: class {token!r} is not one of the model's classes "
                            f"(expected names like {list(class_to_idx)[:3]})")
        return class_to_idx[token]

    out: dict[str, int] = {}
    if "predictionstring" in lines[0].lower().replace(" ", ""):
        # Kaggle ImageNet localization: ImageId,PredictionString("wnid x0 y0 x1 y1 wnid ...").
        for i, row in enumerate(csv.DictReader(lines)):
            pred = (row.get("PredictionString") or "").split()
            if not pred or not row.get("ImageId"):
                raise DataError(f"{path}:{i + 2}: expected 'ImageId,PredictionString' with a wnid first")
            out[_stem(row["ImageId"])] = to_index(pred[0], f"{path}:{i + 2}")
        return out
    for i, line in enumerate(lines):
        parts = line.replace(",", " ").split()
        if len(parts) == 1 and parts[0].isdigit():
            raise DataError(
                f"{path}:{i + 1}: a bare number per line looks like the ILSVRC devkit's "
                f"ILSVRC2012_validation_ground_truth.txt, whose 1-based ILSVRC2012_IDs are NOT the standard "
                f"sorted-wnid order; convert it to 'filename label' lines with 0-based indices, or use "
                f"Kaggle's LOC_val_solution.csv"
            )
        if len(parts) != 2:
            raise DataError(f"{path}:{i + 1}: expected 'filename label', got {line!r}")
        out[_stem(parts[0])] = to_index(parts[1], f"{path}:{i + 1}")
    return out


def resolve_eval_set(root: str | Path, class_names: Sequence[str] | None = None,
                     num_classes: int | None = None, labels_file: str | Path | None = None) -> EvalSet:
    """Find the images under ``root`` and label them in the model's class order.

    Args:
        root: synset folders, or a flat folder of images (then ``labels_file`` is required).
        class_names: the model's class list (see :func:`model_class_names`); None: folder names, sorted.
        num_classes: the model's class count, checked against the data's labels.
        labels_file: ground truth for a flat folder (ignored for synset folders unless given: then it wins).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (pass DATA=/path/to/imagenet/val)")
    class_to_idx = {c: i for i, c in enumerate(class_names)} if class_names else None
    has_dirs = any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir())

    if labels_file is None and has_dirs:
        folders = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        index, mapping = label_space(folders, class_names, num_classes)
        samples, _ = scan_image_folder(root, index)
        names = list(class_names) if class_names else sorted(folders)
        return EvalSet(samples, names, "folders", mapping, str(root))

    if labels_file is None:
        raise DataError(
            f"{root} holds no class folders; for a flat folder of ILSVRC2012_val_*.JPEG pass the ground truth "
            f"with LABELS=... (--labels): Kaggle's LOC_val_solution.csv or a 'filename label' list"
        )
    truth = read_labels_file(labels_file, class_to_idx)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(f"{root} holds no images with extensions {IMG_EXTENSIONS}")
    samples, unlabelled = [], []
    for p in files:
        label = truth.get(p.stem)
        if label is None:
            unlabelled.append(p.name)
        else:
            samples.append(Sample(str(p), label))
    if not samples:
        raise DataError(f"none of the {len(files)} images in {root} is named in {labels_file} "
                        f"(first image {files[0].name!r}, first label entry {next(iter(truth))!r})")
    n_cls = len(class_names) if class_names else num_classes
    bad = sorted({s.label for s in samples if s.label < 0 or (n_cls is not None and s.label >= n_cls)})
    if bad:
        raise DataError(f"{labels_file}: labels {bad[:5]} are outside the model's {n_cls} classes "
                        f"(labels must be 0-based indices into the model's class order)")
    notes = []
    if unlabelled:
        notes.append(f"{len(unlabelled)} images have no entry in the labels file and were skipped "
                     f"(e.g. {unlabelled[:3]})")
        _logger.warning("%s", notes[-1])
    names = list(class_names) if class_names else [str(i) for i in range(n_cls or (max(truth.values()) + 1))]
    mapping = "labels file -> " + ("the model's class list" if class_names else "0-based indices")
    return EvalSet(samples, names, "flat+labels", mapping, str(root), str(labels_file), notes,
                   one_based_suspicions([s.label for s in samples], n_cls, labels_file))


def one_based_suspicions(labels: Sequence[int], num_classes: int | None, source: Any = "labels") -> list[str]:
    """What the labels themselves say about being 1-based (the file format cannot tell 0- from 1-based).

    * exactly 1..K for a K-class subset of a larger model: a 0-based list of the same K classes is 0..K-1;
    * no label 0 although labels start at 1 and are dense: class 0 never appears.
    The prediction-based check (top-1 against label - 1) is :func:`shifted_label_check`.
    """
    distinct = sorted(set(labels))
    if not distinct or distinct[0] != 1:
        return []
    k = len(distinct)
    if distinct == list(range(1, k + 1)):
        return [f"{source}: the labels are exactly 1..{k}; a 0-based list of {k} classes uses 0..{k - 1}, and "
                f"indices into the model's {num_classes or '?'} classes. Are these labels 1-based?"]
    return []


def shifted_label_check(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, Any]:
    """Top-1 (%) of ``predictions`` against the labels as given and shifted by -1/+1, and a verdict.

    When the reference model agrees far better with ``label - 1`` than with the label, the labels are
    almost surely 1-based: every one of them points at the next class.
    """
    import numpy as np

    p, y = np.asarray(predictions), np.asarray(labels)
    acc = {d: float(100.0 * np.mean(p == y + d)) if len(y) else 0.0 for d in (0, -1, 1)}
    suspicious = acc[-1] >= 30.0 and acc[-1] >= max(2 * acc[0], acc[0] + 20.0)
    return {"top1_as_given": acc[0], "top1_label_minus_1": acc[-1], "top1_label_plus_1": acc[1],
            "looks_one_based": bool(suspicious)}
