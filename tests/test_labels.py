"""Evaluation-set layouts (t2t_vit.labels): label files and folder mapping, on small synthetic trees."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from t2t_vit.data import DataError, imagenet_wnids
from t2t_vit.labels import read_labels_file, resolve_eval_set


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def test_plain_list_with_indices_and_wnids(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# comment\nILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG,n01440764\n"
                 "ILSVRC2012_val_00000003 999\n")
    got = read_labels_file(f, {"n01440764": 0, "n01443537": 1})
    assert got == {"ILSVRC2012_val_00000001": 65, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 999}


def test_kaggle_csv_takes_the_first_wnid(tmp_path):
    f = tmp_path / "LOC_val_solution.csv"
    f.write_text("ImageId,PredictionString\nILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n"
                 "ILSVRC2012_val_00000001,n01751748 1 2 3 4 \n")
    wnids = imagenet_wnids()
    got = read_labels_file(f, {w: i for i, w in enumerate(wnids)})
    assert got == {"ILSVRC2012_val_00008726": wnids.index("n02119789"),
                   "ILSVRC2012_val_00000001": wnids.index("n01751748")}


def test_devkit_ground_truth_is_refused_with_an_explanation(tmp_path):
    f = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    f.write_text("490\n361\n171\n")
    with pytest.raises(DataError, match="devkit"):
        read_labels_file(f, None)


def test_wnid_label_without_class_list_says_what_to_do(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("a.JPEG n01440764\n")
    with pytest.raises(DataError, match="class_names"):
        read_labels_file(f, None)


def test_flat_folder_needs_labels_and_uses_them(tmp_path):
    flat = tmp_path / "val"
    for i in (1, 2, 3):
        _img(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataError, match="LABELS="):
        resolve_eval_set(flat, num_classes=1000)
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG 5\nILSVRC2012_val_00000002.JPEG 7\n")
    es = resolve_eval_set(flat, class_names=imagenet_wnids(), labels_file=labels)
    assert [(Path(s.path).name, s.label) for s in es.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 5), ("ILSVRC2012_val_00000002.JPEG", 7)]
    assert es.layout == "flat+labels" and "1 images have no entry" in es.notes[0]
    labels.write_text("ILSVRC2012_val_00000001.JPEG 1000\n")
    with pytest.raises(DataError, match="outside the model's 1000 classes"):
        resolve_eval_set(flat, class_names=imagenet_wnids(), labels_file=labels)


def test_synset_folders_map_into_the_model_class_list(tmp_path):
    for wnid in ("n03888257", "n01440764"):
        _img(tmp_path / wnid / "a.JPEG")
    wnids = imagenet_wnids()
    es = resolve_eval_set(tmp_path, class_names=wnids)
    assert sorted(s.label for s in es.samples) == sorted([wnids.index("n01440764"), wnids.index("n03888257")])
    # A 10-class checkpoint's own list (e.g. trained on the subset) wins over ImageNet indices.
    es = resolve_eval_set(tmp_path, class_names=["n03888257", "x", "n01440764"])
    assert {Path(s.path).parent.name: s.label for s in es.samples} == {"n03888257": 0, "n01440764": 2}
    # No class list: sorted folders, but the count must match the model's head.
    es = resolve_eval_set(tmp_path, num_classes=2)
    assert {Path(s.path).parent.name: s.label for s in es.samples} == {"n01440764": 0, "n03888257": 1}
    with pytest.raises(DataError, match="class_names"):
        resolve_eval_set(tmp_path, num_classes=10)
    with pytest.raises(DataError, match="not among the model's"):
        resolve_eval_set(tmp_path, class_names=["n01440764"])
