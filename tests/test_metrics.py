"""Accuracy and logit-comparison metrics (t2t_vit.metrics), checked against torch formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from t2t_vit.metrics import LogitStats, accuracy, compare_logits, topk_correct


def test_stats_match_torch_reference_formulas():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 11, 8)).astype(np.float32)
    other = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    labels = rng.integers(0, 8, (2, 11))
    st = LogitStats()
    for b in range(2):
        st.update(other[b], labels[b], ref[b], seconds=0.5)
    r_all, o_all, y_all = (torch.from_numpy(a.reshape(22, *a.shape[2:])) for a in (ref, other, labels))
    top1 = (o_all.argmax(1) == y_all).double().mean().item() * 100
    top5 = (o_all.topk(5, 1).indices == y_all[:, None]).any(1).double().mean().item() * 100
    kl = torch.nn.functional.kl_div(o_all.double().log_softmax(1), r_all.double().log_softmax(1),
                                    log_target=True, reduction="batchmean").item()
    ref_top1 = (r_all.argmax(1) == y_all).double().mean().item() * 100
    ref_st = LogitStats()
    ref_st.update(ref.reshape(22, 8), labels.reshape(22), None)
    s = st.summary(ref_st)
    assert s["images"] == 22
    assert s["top1"] == pytest.approx(top1) and s["top5"] == pytest.approx(top5)
    assert s["delta_top1"] == pytest.approx(top1 - ref_top1)
    assert s["top1_agreement"] == pytest.approx((o_all.argmax(1) == r_all.argmax(1)).double().mean().item() * 100)
    assert s["mean_abs_dlogit"] == pytest.approx((o_all - r_all).abs().double().mean().item(), rel=1e-6)
    assert s["max_abs_dlogit"] == pytest.approx((o_all - r_all).abs().max().item(), rel=1e-6)
    assert s["mean_kl"] == pytest.approx(kl, rel=1e-6)
    assert s["images_per_s"] == pytest.approx(22 / 1.0)


def test_stats_count_nonfinite_and_few_classes():
    st = LogitStats()
    logits = np.array([[np.nan, 1.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
    st.update(logits, np.array([0, 1]), None)
    s = st.summary()
    assert s["nonfinite_images"] == 1
    assert s["top5"] == 100.0  # k = min(5, classes): every label is in the top-3 of 3 classes
    assert s["correct_top1"] == 1  # the NaN row never counts as the argmax of a NaN




def test_compare_logits_is_the_streaming_summary_and_uses_percent():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 6))
    cand = ref + 0.5 * rng.standard_normal(ref.shape)
    labels = rng.integers(0, 6, 40)
    c = compare_logits(ref, cand, labels)
    agree = 100 * np.mean(ref.argmax(1) == cand.argmax(1))
    assert c["top1_agreement"] == pytest.approx(agree) and 0 < c["top1_agreement"] < 100
    assert c["disagreements"] == int(np.sum(ref.argmax(1) != cand.argmax(1)))
    assert c["max_abs_dlogit"] == pytest.approx(np.abs(cand - ref).max())
    assert c["max_rel_dlogit"] == pytest.approx(np.abs(cand - ref).max() / np.abs(ref).max())
    assert c["delta_top1"] == pytest.approx(100 * (np.mean(cand.argmax(1) == labels) - np.mean(ref.argmax(1) == labels)))
    a = accuracy(cand, labels)
    assert a == {"images": 40, "top1": pytest.approx(100 * np.mean(cand.argmax(1) == labels)),
                 "top5": pytest.approx(100 * np.mean(topk_correct(cand, labels, 5)))}
    # top-5 by an independent formula
    top5 = np.argsort(-cand, axis=1)[:, :5]
    assert a["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
