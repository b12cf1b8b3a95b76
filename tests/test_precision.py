"""evaluation.precision: TF32 rounding and fp16 LayerNorm emulations against independent formulas, the
statistics hooks, and the command on the tiny model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import precision as PR
from t2t_vit.checkpoint import build_model
from tests.image_helpers import noise_images


def _tf32_reference(x: np.ndarray) -> np.ndarray:
    """TF32 by arithmetic: 11 significant bits (10 stored + the implicit one), round half to even."""
    out = np.empty_like(x)
    for i, v in enumerate(x.ravel()):
        if not np.isfinite(v) or v == 0:
            out.ravel()[i] = v
            continue
        m, e = math.frexp(float(v))  # v = m * 2**e, 0.5 <= |m| < 1
        out.ravel()[i] = np.float32(np.round(m * 2**11) / 2**11 * 2.0**e)
    return out


def test_round_tf32_is_round_to_nearest_even_with_10_mantissa_bits():
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2 ** -130 * 1.5], np.float32)
    got = PR.round_tf32(torch.from_numpy(ties)).numpy()
    assert got[0] == 1.0 and got[1] == np.float32(1 + 2**-9) and got[2] == -1.0  # ties go to even
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 8, 2000)).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, np.nan, 0.0, 65504.0, 3.4e38], np.float32)])
    got = PR.round_tf32(torch.from_numpy(x)).numpy()
    want = _tf32_reference(x)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[-4]) and np.isinf(got[-6]) and np.isinf(got[-5])
    # at most half a TF32 ulp away: |x - tf32(x)| <= 2**-11 |x|
    assert np.all(np.abs(got[:2000] - x[:2000]) <= 2.0**-11 * np.abs(x[:2000]) * (1 + 1e-6))


def test_tf32_scopes_touch_only_what_they_name():
    torch.manual_seed(0)
    model = build_model("t2t_vit_test").eval()
    model.set_soft_split_impl("grouped")
    model.set_fused_attn(False)
    x = torch.randn(2, 3, 64, 64)
    calls = {"island": 0}
    with torch.no_grad():
        ref = model(x)
        with PR.tf32_matmuls("none"):
            assert torch.equal(model(x), ref)
        with PR.tf32_matmuls("all"):
            all_tf32 = model(x)
        with PR.tf32_matmuls("performer"):
            island = model(x)
            lin = model.head
            feat = torch.randn(3, lin.in_features)
            assert torch.equal(F.linear(feat, lin.weight, lin.bias), torch.nn.functional.linear(feat, lin.weight, lin.bias))
            assert torch.equal(lin(feat), feat @ lin.weight.T + lin.bias)  # outside the island: plain fp32
    assert not torch.equal(all_tf32, ref) and not torch.equal(island, ref)
    # rounding inputs moves logits by roughly the TF32 epsilon, not more
    assert (all_tf32 - ref).abs().max() < 1e-2 * ref.abs().max()
    assert torch.matmul is not None and F.linear.__name__ == "linear"  # patches undone
    del calls


def test_fp16_layernorm_emulation():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 96) * 3 + 1
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    ref = F.layer_norm(x, (96,), w, b)
    for mode in ("fp16-io", "fp16-math"):
        y = PR.fp16_layernorm(mode)(x, (96,), w, b)
        assert (y - ref).abs().max() < 2e-2 and y.dtype == x.dtype
    # A deviation past 256 overflows the fp16 square: the variance is inf, 1/sqrt(var) is 0, and the token
    # silently collapses to the LayerNorm bias (finite, and wrong). fp32 math keeps it.
    big = x.clone()
    big[0, 0, 0] = 400.0
    y = PR.fp16_layernorm("fp16-math")(big, (96,), w, b)
    assert torch.allclose(y[0, 0], b, atol=2e-3) and not torch.allclose(F.layer_norm(big, (96,), w, b)[0, 0], b, atol=0.1)
    assert torch.allclose(y[1:], F.layer_norm(big, (96,), w, b)[1:], atol=2e-2)  # other tokens unaffected
    y_io = PR.fp16_layernorm("fp16-io")(big, (96,), w, b)
    assert (y_io - F.layer_norm(big, (96,), w, b)).abs().max() < 2e-2
    # pairwise fp16 sum: 2048 ones is exact, 70000 in halves overflows
    assert PR._tree_sum_fp16(torch.ones(1, 2048)).item() == 2048
    assert math.isinf(PR._tree_sum_fp16(torch.full((1, 4), 20000.0)).item())


def test_stats_hooks_against_direct_computation():
    torch.manual_seed(1)
    model = build_model("t2t_vit_test").eval()
    xs = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)]
    stats = {s["module"]: s for s in PR.layernorm_stats(model, xs)}
    captured = []
    h = model.norm.register_forward_hook(lambda m, i, o: captured.append(i[0].double()))
    with torch.no_grad():
        for x in xs:
            model(x)
    h.remove()
    d = torch.cat([c - c.mean(-1, keepdim=True) for c in captured])
    s = stats["norm"]
    assert s["max_abs_dev"] == pytest.approx(float(d.abs().max()))
    assert s["max_sum_sq"] == pytest.approx(float((d * d).sum(-1).max()))
    assert s["fp16_headroom"] == pytest.approx(min(65504 / s["max_abs_dev"] ** 2, 65504 / s["max_sum_sq"]))
    acts = {a["module"]: a for a in PR.activation_stats(model, xs)}
    a = acts["head"]
    feats = torch.cat([model.forward_features(x)[:, 0] for x in xs]).detach().abs()
    assert a["max_abs"] == pytest.approx(float(feats.max()), rel=1e-6)
    assert a["top_channels"][0]["channel"] == int(feats.amax(0).argmax())
    assert 0 < a["p9999_abs"] <= a["max_abs"]


@pytest.mark.slow
def test_command_writes_three_reports(tmp_path):
    data = noise_images(tmp_path / "val", size=72)
    rc = PR.main(["--model", "t2t_vit_test", "--data", str(data), "--out", str(tmp_path / "r"), "--threads", "1",
                  "--workers", "0", "--no-progress"])
    assert rc == 0
    for name in ("precision-tf32", "precision-layernorm", "activations"):
        rep = json.loads((tmp_path / "r" / f"{name}-t2t_vit_test.json").read_text())
        assert rep["tool"] == "evaluation.precision" and rep["images"] == 6
    tf32 = json.loads((tmp_path / "r" / "precision-tf32-t2t_vit_test.json").read_text())
    assert [r["variant"].split(",")[0] for r in tf32["rows"]][:3] == ["fp32 (reference", "fp32 model", "fp32 model"]
    assert tf32["rows"][0]["top1_agreement"] == 100.0 and tf32["rows"][0]["max_abs_dlogit"] == 0.0
    ln = json.loads((tmp_path / "r" / "precision-layernorm-t2t_vit_test.json").read_text())
    assert len(ln["layernorms"]) == 9 and ln["min_fp16_headroom"] > 0
