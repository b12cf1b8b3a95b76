"""Which input size a checkpoint runs at (issue 24, item 6): the size it records (this project's ``meta``, a
``.safetensors`` file's ``img_size`` metadata) silently; otherwise the size its fixed ``pos_embed`` table
implies, or the registry default, each with one note saying which and why."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t2t_vit
from t2t_vit.checkpoint import build_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def trained_at_32():
    # t2t_vit_test's registry size is 64; these weights were "trained" at 32 (a 2x2 token grid).
    assert build_model("t2t_vit_test").img_size == 64
    return t2t_vit.T2TViT(img_size=32, num_classes=5, **t2t_vit.ARCHS["t2t_vit_test"]).state_dict()


def _notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "records no input size" in r.getMessage()]


def test_bare_state_dict_and_safetensors_run_at_their_pos_embed_size_with_a_note(tmp_path, trained_at_32, caplog):
    from safetensors.torch import save_file

    torch.save(trained_at_32, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in trained_at_32.items()}, tmp_path / "w.safetensors")
    for f in ("w.pth", "w.safetensors"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            m = build_model("t2t_vit_test", tmp_path / f)
        assert m.img_size == 32 and m.pretrained_cfg["img_size_from"] == "pos_embed"
        notes = _notes(caplog)
        assert len(notes) == 1 and "2x2 token grid" in notes[0] and "32 px is assumed" in notes[0], notes
        assert "--img-size" in notes[0] and f in notes[0]


def test_recorded_sizes_are_used_without_a_note(tmp_path, trained_at_32, caplog):
    from safetensors.torch import save_file

    # The size a file records wins over its pos_embed (here deliberately another grid: 64 recorded, 32 table).
    save_file({k: v.contiguous() for k, v in trained_at_32.items()}, tmp_path / "m.safetensors",
              metadata={"img_size": "64"})
    torch.save({"state_dict": trained_at_32, "meta": {"img_size": 48}}, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING):
        assert build_model("t2t_vit_test", tmp_path / "m.safetensors").img_size == 64
        m = build_model("t2t_vit_test", tmp_path / "m.pth")
        assert m.img_size == 48 and m.pretrained_cfg["img_size_from"] == "checkpoint"
        # --img-size beats everything, also without a note.
        assert build_model("t2t_vit_test", tmp_path / "m.pth", img_size=96).img_size == 96
        assert build_model("t2t_vit_test", tmp_path / "m.pth", img_size=32).pretrained_cfg["img_size_from"] \
            == "--img-size"
    assert _notes(caplog) == []


def test_no_pos_embed_falls_back_to_the_registry_with_a_note(tmp_path, trained_at_32, caplog):
    sd = {k: v for k, v in trained_at_32.items() if k != "pos_embed"}
    torch.save(sd, tmp_path / "nope.pth")
    with caplog.at_level(logging.WARNING):
        m = build_model("t2t_vit_test", tmp_path / "nope.pth", strict=False)  # strict loading wants pos_embed
    assert m.img_size == 64 and m.pretrained_cfg["img_size_from"] == "registry"
    notes = _notes(caplog)
    assert len(notes) == 1 and "registry default of t2t_vit_test, 64 px" in notes[0] and "no pos_embed" in notes[0]


def test_the_note_reaches_a_user_of_a_stage(tmp_path, trained_at_32):
    torch.save(trained_at_32, tmp_path / "w.pth")
    r = subprocess.run([sys.executable, "-m", "export.to_onnx", "--model", "t2t_vit_test", "--checkpoint",
                        str(tmp_path / "w.pth"), "--out", str(tmp_path / "out"), "--val-images", "0", "--threads", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("records no input size") == 1 and "32 px is assumed" in r.stderr
    meta = __import__("onnx").load(next((tmp_path / "out").glob("*.fp32.onnx")), load_external_data=False)
    assert {p.key: p.value for p in meta.metadata_props}["img_size"] == "32"
