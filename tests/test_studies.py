"""The studies package: its driver, the oneDNN Linear kernel study, the model benchmark's report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import t2t_vit  # noqa: F401  (registers the models)
from studies import __main__ as driver
from studies.onednn import OneDNNLinear, onednn_linears
from tests.test_model import _randomize  # weights with realistic scales (logits O(1..10))

pytestmark = pytest.mark.timeout(300)


def test_every_question_names_a_study_with_a_make_target():
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for name, q in driver.QUESTIONS.items():
        assert f"{q.target}:\n\t$(PYTHON) -m studies {name} " in text, q.target
        assert callable(__import__(q.module, fromlist=["main"]).main)


def test_driver_lists_the_questions_and_refuses_an_unknown_one(capsys):
    assert driver.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out and q.target in out for name, q in driver.QUESTIONS.items())
    assert driver.main([]) == 2
    assert "studies: error: no question given" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "studies", "speed"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("studies: error: unknown question 'speed'")


def test_driver_passes_the_flags_to_the_study(capsys):
    """``python -m studies busy --conditions ...`` is ``python -m studies.bench_busy --conditions ...``."""
    rc = driver.main(["busy", "--conditions", "noisy:auto", "--out", "/nonexistent"])
    assert rc == 2 and "studies.bench_busy: error:" in capsys.readouterr().err


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_onednn_linears_equal_the_model(name):
    model = _randomize(timm.create_model(name, img_size=64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = onednn_linears(model)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert linears > 0 and sum(type(m) is OneDNNLinear for m in fast.modules()) == linears
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    # The caller's model is untouched: still plain Linears with the same weights.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="float32 on the CPU"):
        fast.head(torch.randn(2, fast.head.in_features, dtype=torch.bfloat16))
    # The copy copies again (oneDNN tensors have no storage of their own to deep-copy).
    again = onednn_linears(fast)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-5)
        # The cls-only last block takes the swapped kernel too (one projection, q's class row taken from it).
        fast.set_cls_only_last_block(True)
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """The bench-model command runs end to end (tiny model) and its report is self-consistent."""
    from studies import bench_model

    rc = bench_model.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--attn-model", "t2t_vit_test",
                           "--throughput-models", "t2t_vit_test", "--img-size", "32"])
    assert rc == 0
    report = json.loads((tmp_path / "bench-model-cpu-32px.json").read_text())
    assert (tmp_path / "bench-model-cpu-32px.md").read_text().startswith("# Model benchmark")
    first = {}
    for r in report["results"]:
        first.setdefault((r["kind"], r["attention"], r["batch"]), r)
    fwd_s, fwd_e = first[("forward", "sdpa", 8)], first[("forward", "explicit", 8)]
    key = next(k for k in report["ratios"] if k.startswith("forward speed-up"))
    assert report["ratios"][key] == pytest.approx(fwd_e["latency_ms_median"] / fwd_s["latency_ms_median"])
    for r in report["results"]:
        assert r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r.get("latency_ms_median") or r["step_ms_median"]) * 1e3)
    assert report["host"]["torch"] == torch.__version__ and report["tool"] == "studies.bench_model"


def test_study_reports_render_as_committed():
    """The committed reports' Markdown is what the studies render from the committed JSON (tables through
    t2t_vit.reports.markdown_table): moving the studies changed no report's format."""
    from studies import bench_model, bench_onnx, bench_train

    reports = Path(__file__).resolve().parents[1] / "reports"

    def load(stem):
        if not (reports / f"{stem}.json").is_file():
            pytest.skip(f"reports/{stem}.json is not committed in this checkout")
        return json.loads((reports / f"{stem}.json").read_text()), (reports / f"{stem}.md").read_text()

    report, md = load("bench-model-cpu")
    assert bench_model.to_markdown(report) == md
    report, md = load("bench-onnx-cpu")
    assert bench_onnx.render_markdown(report) == md
    report, md = load("bench-train-cpu")
    assert "\n".join(bench_train.render_markdown(report, "cpu")).rstrip() == md.rstrip()


def test_markdown_table_right_aligns_the_columns_it_is_told():
    from t2t_vit.reports import markdown_table

    assert markdown_table(["a", "b", "c"], [["x", 1.5, "2.0"]], right=[1, 2]).splitlines() == [
        "| a | b | c |", "|---|---:|---:|", "| x | 1.50 | 2.0 |"]
    assert markdown_table(["a"], [[None]]).splitlines()[1:] == ["|---|", "| - |"]
