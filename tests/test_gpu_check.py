"""studies.gpu_check: the CPU dry run of the lent-GPU script (every section with the tiny models), its
one-line failure without CUDA, the carry pack, and the numpy-drawn golden weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from studies import gpu_check as G
from t2t_vit.checkpoint import build_model, read_checkpoint
from tests.image_helpers import noise_images

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A t2t_vit_test training-style checkpoint at 64 px (with optimizer state) and a val folder."""
    root = tmp_path_factory.mktemp("gpu")
    val = noise_images(root / "val", per_class=5, size=70, name="{i}.JPEG")
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_test", num_classes=1000, img_size=64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ck = root / "best.pth"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": model.state_dict(), "optimizer": opt.state_dict(),
                "weights": "model", "meta": {"model": "t2t_vit_test", "img_size": 64}}, ck)
    return ck, val


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studies.gpu_check", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_dry_run_checks_every_section(tiny, tmp_path):
    ck, val = tiny
    res = _run("--dry-run", "--checkpoint", str(ck), "--data", str(val), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    assert rep["dry_run"] and rep["device"] == "cpu" and (tmp_path / "gpu-check-dry-run.md").is_file()
    par = rep["sections"]["parity"]["rows"]
    assert {(p["model"], p["attention"]) for p in par} == {(m, a) for m in ("t2t_vit_test", "t2t_vit_t_test")
                                                          for a in ("sdpa", "explicit")}
    assert all(p["passed"] and p["rel"] < G.PARITY_TOL for p in par)
    auto = rep["sections"]["autocast"]
    assert auto["images"] == 8 and auto["img_size"] == 64 and auto["model"] == "t2t_vit_test"
    assert [r["variant"].split(" ")[0] for r in auto["rows"]] == ["fp32", "fp16", "bf16", "fp16"]
    assert auto["rows"][0]["top1_agreement"] == 100.0
    train = rep["sections"]["train"]
    assert [r["formulation"] for r in train["rows"]] == ["ours, sdpa", "ours, explicit",
                                                         "authors' (explicit, einsum Performer)"]
    assert all(r["img_per_s"] > 0 and r["peak_mem_mib"] > 0 for r in train["rows"])
    assert "torch.compile: not run" in train["note"]


def test_dry_run_without_checkpoint_skips_autocast_with_a_note(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path), "--steps", "1")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    assert rep["sections"]["autocast"]["skipped"].startswith("skipped: needs --checkpoint")
    assert "skipped: needs --checkpoint" in (tmp_path / "gpu-check-dry-run.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_without_cuda_fails_with_one_line(tmp_path):
    res = _run("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "studies.gpu_check: error: no CUDA device visible to PyTorch (torch.cuda.is_available() is False); run "
        "this on the lent GPU machine, or pass --dry-run to check the script on a CPU"]
    assert not list(tmp_path.iterdir())  # nothing written


def test_make_gpu_check_passes_the_dry_run_and_reports_to_report_dir(tmp_path):
    out = subprocess.run(["make", "-n", "gpu-check", "ARGS=--dry-run", f"REPORT_DIR={tmp_path}",
                          "GPU_CHECKPOINT=/nonexistent.pth"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "-m studies gpu" in out and f"--out {tmp_path} --dry-run" in out
    assert "--checkpoint" not in out  # an absent checkpoint is left out: the autocast section is skipped


def test_pack_carries_weights_only_and_a_balanced_sample(tiny, tmp_path):
    ck, val = tiny
    res = _run("--pack", str(tmp_path / "pack"), "--checkpoint", str(ck), "--data", str(val), "--limit", "4")
    assert res.returncode == 0, res.stderr
    pack = tmp_path / "pack"
    obj = read_checkpoint(pack / "weights.pth")
    assert set(obj) == {"state_dict", "weights", "meta"}  # no optimizer, no EMA twin
    src = read_checkpoint(ck)["state_dict"]
    assert all(torch.equal(obj["state_dict"][k], v) for k, v in src.items())
    assert sorted(p.parent.name for p in (pack / "val").rglob("*.JPEG")) == ["n01440764"] * 2 + ["n02102040"] * 2
    model = build_model("t2t_vit_test", pack / "weights.pth")
    assert model.img_size == 64
    bad = _run("--pack", str(tmp_path / "p2"), "--checkpoint", str(ck))
    assert bad.returncode == 2 and "--pack needs --checkpoint and --data" in bad.stderr


def test_golden_weights_are_numpy_drawn_and_reproducible():
    a = timm.create_model("t2t_vit_test", num_classes=10, img_size=64)
    torch.manual_seed(123)  # the torch RNG plays no part
    b = timm.create_model("t2t_vit_test", num_classes=10, img_size=64)
    wa, wb = G.golden_weights(a), G.golden_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w = wa["tokens_to_token.attention1.w"]  # orthogonal rows of norm sqrt(m)
    m = w.shape[0]
    torch.testing.assert_close(w @ w.t(), m * torch.eye(m), atol=1e-4, rtol=0)
    assert torch.equal(wa["pos_embed"], a.pos_embed.data)


def test_authors_trainable_is_the_authors_formulation_with_gradients():
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_t_test", num_classes=10, img_size=64).eval()
    authors = G.AuthorsTrainable(model)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(authors(x), model(x), atol=1e-5, rtol=0)
    authors(x).sum().backward()
    grads = {n: w.grad for n, w in zip(authors.names, authors.weights)}
    assert grads["pos_embed"] is None  # frozen, as in the model
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n not in ("pos_embed",))
