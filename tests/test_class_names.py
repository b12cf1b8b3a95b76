"""Readable ImageNet class names in reports, not only wnids (issue 24, item 8).

t2t_vit.labels maps the 1000 wnids (timm's list, the model's index order) to torchvision's names. The
checks are independent of both: WordNet pairs known by heart (Imagenette's ten classes), timm's WordNet
glosses, and ../shared/data/imagenet1k_classes.tsv where present.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from t2t_vit.data import Sample, imagenet_wnids
from t2t_vit.labels import EvalSet, imagenet_class_names, readable_class

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("T2T_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = {  # fast.ai's Imagenette: its ten synsets and their names
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}


def test_known_pairs_and_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000 and list(names) == imagenet_wnids()  # one name per index, in the model's order
    for wnid, name in IMAGENETTE.items():
        assert names[wnid] == name
    assert len(set(names.values())) == 1000  # the two duplicated WordNet lemmas come disambiguated
    assert names["n02012849"] == "crane bird" and names["n03126707"] == "crane"


def test_names_agree_with_timm_wordnet_glosses():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    glosses = dict(zip(info.label_names(), info.label_descriptions()))
    names = imagenet_class_names()
    # every torchvision name is one of the synset's lemmas (or, for the 2 disambiguated ones, starts with it)
    off = [w for w, n in names.items()
           if not any(n.lower() == lemma.strip().lower() or n.lower().startswith(lemma.strip().lower() + " ")
                      for lemma in glosses[w].split(","))]
    assert off == []


@pytest.mark.data
def test_names_agree_with_the_shared_class_list():
    tsv = SHARED / "imagenet1k_classes.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} not present")
    names = imagenet_class_names()
    with tsv.open() as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r]
    assert len(rows) == 1000
    wnids = imagenet_wnids()
    for index, wnid, name in rows:
        assert wnids[int(index)] == wnid
        # equal, or our disambiguated form of a duplicated lemma ("crane" -> "crane bird")
        assert names[wnid] == name or names[wnid].startswith(name + " "), (wnid, name, names[wnid])


def test_readable_class_and_reports_use_it():
    assert readable_class("n01440764") == "tench (n01440764)"
    assert readable_class("cat") == "cat"  # a user's own folder name stays as it is
    ev = EvalSet(samples=[Sample("a.jpg", 0), Sample("b.jpg", 0), Sample("c.jpg", 217)],
                 class_names=imagenet_wnids(), layout="folders", mapping="")
    assert ev.label_summary()["per_class"] == {"0 tench (n01440764)": 2, "217 English springer (n02102040)": 1}


def test_parity_disagreement_csv_names_the_classes(tmp_path):
    import numpy as np

    from evaluation.parity import _write_disagreements

    path = tmp_path / "d.csv"
    _write_disagreements(path, ["a.jpg", "b.jpg"], np.array([0, 217]), np.array([0, 217]),
                         {"onnxruntime-cpu-int8": np.array([0, 482])}, imagenet_wnids(), only_disagreements=True)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 1 and rows[0]["label_name"] == "English springer (n02102040)"
    assert rows[0]["onnxruntime-cpu-int8_name"] == "cassette player (n02979186)"
