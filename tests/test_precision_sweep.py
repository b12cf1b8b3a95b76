"""The resolution sweep of evaluation.precision (issue 20): the Performer core's intermediates against an
independent numpy computation, the statistics hooks, the sweep command on the tiny model, and the export
report's headroom statement."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import precision as PR
from export.to_onnx import sweep_headroom
from t2t_vit.checkpoint import build_model
from t2t_vit.layers import TokenPerformer
from t2t_vit.checkpoint import trained_like_

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def _numpy_core(k, q, v, w, eps):
    """The authors' released formula, term by term in float64 numpy, and the max-shifted form's bounds."""
    k, q, v, w = (np.asarray(t, dtype=np.float64) for t in (k, q, v, w))
    m = w.shape[0]
    phi = lambda x: np.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdims=True)) / np.sqrt(m)  # noqa: E731
    pq, pk = phi(q), phi(k)
    ksum = pk.sum(axis=1)                                   # (B, m)
    d = np.einsum("btm,bm->bt", pq, ksum)                   # (B, T)
    kv = np.einsum("bsm,bse->bme", pk, v)
    num = np.einsum("btm,bme->bte", pq, kv)
    return {"phi_q": pq, "phi_k": pk, "sum_phi_k": ksum, "D": d, "numerator": num,
            "y": num / (d[..., None] + eps), "k_sq": (k * k).sum(-1), "wk": k @ w.T}


def test_performer_core_extremes_against_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    b, t, e, m = 2, 11, 8, 4
    k, q, v = (2.0 * torch.randn(b, t, e, generator=gen) for _ in range(3))
    w = torch.nn.init.orthogonal_(torch.empty(m, e), generator=gen) * math.sqrt(m)
    got = PR.performer_core_extremes(k, q, v, w, 1e-8)
    ref = _numpy_core(k.numpy(), q.numpy(), v.numpy(), w.numpy(), 1e-8)
    for name in PR.AUTHORS_TERMS:
        assert got["authors_max"][name] == pytest.approx(np.abs(ref[name]).max(), rel=1e-9), name
    # The max-shifted form: the same output, features <= 1 (the largest exactly 1), sums <= 1, D <= m.
    assert got["max"]["y"] == pytest.approx(np.abs(ref["y"]).max(), rel=1e-6)
    assert got["max"]["exp_q"] == pytest.approx(1.0) and got["max"]["exp_k"] <= 1.0 / t + 1e-12
    assert got["max"]["k_sum"] <= 1.0 + 1e-12 and got["max"]["D"] <= m + 1e-12
    assert got["max"]["k_sq_sum"] == pytest.approx(ref["k_sq"].max(), rel=1e-9)
    assert got["max"]["w_k"] == pytest.approx(np.abs(ref["wk"]).max(), rel=1e-9)
    assert got["tokens"] == t and 0.0 <= got["exp_k_underflow"] <= 1.0 and got["min_D"] > 0


def test_performer_stats_hook_sees_the_cores_inputs():
    torch.manual_seed(2)
    model = trained_like_(build_model("t2t_vit_test")).eval()
    xs = [torch.randn(2, 3, 64, 64), torch.randn(1, 3, 64, 64)]
    stats = {s["module"]: s for s in PR.performer_stats(model, xs)}
    assert set(stats) == {"tokens_to_token.attention1", "tokens_to_token.attention2"}
    assert TokenPerformer.linear_attention.__name__ == "linear_attention"  # the patch is undone
    # Independent capture: the kqv Linear's output, split in the authors' order k, q, v.
    mod = model.tokens_to_token.attention1
    captured = []
    h = mod.kqv.register_forward_hook(lambda m_, i, o: captured.append(o.detach()))
    with torch.no_grad():
        for x in xs:
            model(x)
    h.remove()
    d_max = max(np.abs(_numpy_core(*[t.numpy() for t in torch.split(c, mod.emb, -1)], mod.w.numpy(), 1e-8)["D"]).max()
                for c in captured)
    s = stats["tokens_to_token.attention1"]
    assert s["authors_max"]["D"] == pytest.approx(d_max, rel=1e-6)
    assert s["tokens"] == 16 * 16  # 64 px: (64 + 4 - 7) // 4 + 1 = 16 per side
    assert s["fp16_headroom"] == pytest.approx(65504 / max(s["max"].values()))
    assert s["worst"] == max(s["max"], key=s["max"].get)


def test_largest_safe_size_stops_at_the_first_unsafe_size():
    sizes = [{"img_size": n, "safe": {"fp16_layernorm": ok, "fp16_graph": True}}
             for n, ok in ((80, True), (160, True), (224, False), (384, True))]
    assert PR.largest_safe_sizes(sizes) == {"fp16_layernorm": 160, "fp16_graph": 384}
    sizes[0]["safe"]["fp16_layernorm"] = False
    assert PR.largest_safe_sizes(sizes)["fp16_layernorm"] is None


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("sweep") / "val"
    for c in ("n01440764", "n02102040"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    return data


@pytest.fixture(scope="module")
def sweep_report(val_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sweep-out")
    rc = PR.main(["--model", "t2t_vit_test", "--data", str(val_folder), "--out", str(out), "--sweep", "64,32",
                  "--threads", "1", "--workers", "0", "--no-progress"])
    assert rc == 0
    for ext in ("json", "md", "png"):
        assert (out / f"precision-sweep-t2t_vit_test.{ext}").is_file()
    rep = json.loads((out / "precision-sweep-t2t_vit_test.json").read_text())
    rep["_path"] = str(out / "precision-sweep-t2t_vit_test.json")
    return rep


def test_sweep_measures_every_size_with_the_same_images(sweep_report, val_folder):
    rep = sweep_report
    assert [s["img_size"] for s in rep["sizes"]] == [32, 64] and rep["weights"] == "random (trained-like)"
    assert [s["tokens"]["attention1"] for s in rep["sizes"]] == [8 * 8, 16 * 16]
    assert all(s["images"] == 6 for s in rep["sizes"])
    for s in rep["sizes"]:
        assert len(s["layernorms"]) == 9 and len(s["performers"]) == 2
        assert s["min_headroom"]["fp16_layernorm"] == min(x["fp16_headroom"] for x in s["layernorms"])
        assert {r["variant"] for r in s["rows"]} == set(PR.SWEEP_CHOICE_TEXT.values())
    assert set(rep["largest_safe"]) == set(PR.SWEEP_CHOICES)
    # The LayerNorm numbers are those of layernorm_stats on the same model and images (the shared code).
    from types import SimpleNamespace
    model = PR.sweep_model("t2t_vit_test", None, 64)
    other = PR.sweep_model("t2t_vit_test", None, 32)  # the same weights at every size (the table aside)
    for k, v in other.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, model.state_dict()[k]), k
    samples, _ = PR._samples(SimpleNamespace(data=str(val_folder), limit=None), model)
    xs, _ = PR._batches(samples, model, SimpleNamespace(batch_size=64, workers=0))
    direct = {x["module"]: x["max_sum_sq"] for x in PR.layernorm_stats(model, xs)}
    assert {x["module"]: x["max_sum_sq"] for x in rep["sizes"][1]["layernorms"]} == pytest.approx(direct)


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "32,40"], "--sweep sizes must be positive multiples of 16"),
    (["--what", "tf32,sweep", "--sweep", "32"], "--what sweep runs on its own"),
    (["--what", "sweep"], "--what sweep needs the sizes"),
])
def test_sweep_flags_fail_with_one_line(argv, message, tmp_path):
    res = subprocess.run([sys.executable, "-m", "evaluation.precision", "--model", "t2t_vit_test", "--out",
                          str(tmp_path), *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("evaluation.precision: error: ")
    assert message in res.stderr and "Traceback" not in res.stderr


def test_export_states_the_headroom_and_warns_past_the_safe_size(sweep_report):
    sw = dict(sweep_report)
    sw["largest_safe"] = {"fp16_layernorm": 32, "fp16_performer_core": 64, "fp16_graph": 64}
    at64 = sweep_headroom(sw, "t2t_vit_test", 64, layernorm="fp32", fp32_core=True)
    h = sw["sizes"][1]["min_headroom"]["fp16_layernorm"]
    assert f"headroom at 64 px: {h:.3g}x" in "\n".join(at64["lines"]) and at64["warnings"] == []
    fp16_ln = sweep_headroom(sw, "t2t_vit_test", 64, layernorm="fp16", fp32_core=True)
    assert fp16_ln["warnings"] == ["fp16 LayerNorm at 64 px is past the largest size measured safe (32 px; (given))"]
    beyond = sweep_headroom(sw, "t2t_vit_test", 96, layernorm="fp32", fp32_core=True)
    assert any("beyond the sweep" in w for w in beyond["warnings"])
    assert sweep_headroom(sw, "t2t_vit_7", 64, layernorm="fp16", fp32_core=False) is None  # another model


@pytest.mark.slow
def test_export_report_carries_the_sweep_statement(sweep_report, tmp_path):
    sw = dict(sweep_report)
    sw["largest_safe"] = {**sw["largest_safe"], "fp16_graph": 32}  # 64 px is then past the safe size
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sw))
    res = subprocess.run([sys.executable, "-m", "export.to_onnx", "--model", "t2t_vit_test", "--img-size", "64",
                          "--out", str(tmp_path / "onnx"), "--val-images", "0", "--threads", "1",
                          "--precision-sweep", str(path)], cwd=REPO, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr
    assert "!! WARNING: the fp16 graph as exported at 64 px is past the largest size measured safe (32 px" in res.stderr
    md = (tmp_path / "onnx" / "t2t_vit_test.export.md").read_text()
    assert "## fp16 headroom at 64 px" in md and "**WARNING: the fp16 graph as exported at 64 px" in md
    rep = json.loads((tmp_path / "onnx" / "t2t_vit_test.export.json").read_text())
    assert rep["precision_sweep"]["img_size"] == 64 and rep["precision_sweep"]["warnings"]
