"""evaluation.evidence (make precision-evidence): every step runs on the tiny model, the summary's numbers are
the step reports' numbers (read here independently from the stage JSONs), a rerun skips what is up to date,
an input that changed reruns its consumer, bad input is one line and exit 2, SIGTERM stops the child."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evaluation import evidence as E
from tests.image_helpers import noise_images

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
MODEL = "t2t_vit_test"
NAME = f"precision-evidence-{MODEL}-64"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Noise ImageFolders (two ImageNet classes) and a checkpoint of trained-like random weights."""
    from t2t_vit.checkpoint import build_model, trained_like_

    base = tmp_path_factory.mktemp("evidence")
    torch.manual_seed(0)
    model = trained_like_(build_model(MODEL).eval())
    ckpt = base / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"model": MODEL, "img_size": 64}}, ckpt)
    return {"base": base, "ckpt": ckpt, "val": noise_images(base / "val", per_class=3, size=72),
            "train": noise_images(base / "train", per_class=4, size=72, name="t{i}.png")}


def _argv(inputs: dict[str, Path], *extra: str) -> list[str]:
    b = inputs["base"]
    return ["--model", MODEL, "--checkpoint", str(inputs["ckpt"]), "--data", str(inputs["val"]),
            "--calib-data", str(inputs["train"]), "--calib-size", "8", "--percentile", "99", "--layer-images", "4", "--out", str(b / "out"),
            "--report-dir", str(b / "reports"), "--threads", "1", "--in-process", *extra]


@pytest.fixture(scope="module")
def first_run(inputs):
    rc = E.main(_argv(inputs))
    b = inputs["base"]
    summary = json.loads((b / "reports" / f"{NAME}.json").read_text())
    return rc, summary, b / "out" / "model"


def _step_json(model_dir: Path, name: str) -> dict:
    return json.loads((model_dir / name).read_text())


@pytest.mark.slow
def test_every_step_ran_and_the_summary_is_written(first_run, inputs):
    rc, s, model_dir = first_run
    status = {st["step"]: st["status"] for st in s["steps"]}
    assert [st["step"] for st in s["steps"]] == list(E.STEPS)
    for step in E.STEPS:
        if step == "calib-fp8" and "fp8" not in E.calib_precisions():
            fp8 = next(st for st in s["steps"] if st["step"] == step)
            assert status[step] == "skipped" and fp8["reason"].startswith("make calib PRECISION=fp8 not available")
        else:
            assert status[step] in ("ok", "threshold"), (step, status)
    # exit code: 1 exactly when a decision is to revisit or parity failed
    revisit = any(d["verdict"] == "revisit" for d in s["decisions"]) or s["checks"]["parity"]["verdict"] == "FAIL"
    assert rc == (1 if revisit else 0)
    assert s["checkpoint_sha256"] == hashlib.sha256(inputs["ckpt"].read_bytes()).hexdigest()
    assert s["img_size"] == 64 and s["host"]["cpu"] and s["command"].startswith("python -m evaluation.evidence")
    # every linked step report exists, and is a byte copy of the stage's own file
    md = (inputs["base"] / "reports" / f"{NAME}.md").read_text()
    for st in s["steps"]:
        for f in st["reports"]:
            copy = inputs["base"] / "reports" / f
            assert copy.read_bytes() == (model_dir / Path(f).name).read_bytes()
            if f.endswith(".md"):
                assert f"]({f})" in md
    assert "## TF32 off: **" in md and "## Parity: **" in md


@pytest.mark.slow
def test_summary_numbers_equal_the_step_reports(first_run):
    _, s, model_dir = first_run
    d = {x["decision"]: x for x in s["decisions"]}

    def triple(row):
        return row["top1_agreement"], row["max_abs_dlogit"], row["delta_top1"]

    tf32 = _step_json(model_dir, f"precision-tf32-{MODEL}.json")
    assert [triple(r) for r in d["TF32 off"]["rows"]] == [
        (r["top1_agreement"], r["max_abs_dlogit"], r["delta_top1"]) for r in tf32["rows"][1:]]
    every = tf32["rows"][1]
    fp32_ok = every["delta_top1"] == 0 and every["top1_agreement"] >= 99.9
    assert d["TF32 off"]["verdict"] == ("revisit" if fp32_ok else "holds")

    ln = _step_json(model_dir, f"precision-layernorm-{MODEL}.json")
    headroom = min(min(65504.0 / x["max_abs_dev"] ** 2, 65504.0 / x["max_sum_sq"]) for x in ln["layernorms"])
    assert d["LayerNorm in fp32"]["rows"][0]["headroom"] == pytest.approx(headroom, rel=1e-12)
    assert [triple(r) for r in d["LayerNorm in fp32"]["rows"][1:]] == [
        (r["top1_agreement"], r["max_abs_dlogit"], r["delta_top1"]) for r in ln["rows"]]

    export = _step_json(model_dir, f"{MODEL}.export.json")["validation"]
    comps = {c["name"]: c for c in export["comparisons"]}
    island = d["Performer core in fp32"]["rows"]
    with_, without = comps["ORT fp16 vs ORT fp32"], comps["ORT fp16 without the fp32 island vs ORT fp32"]
    assert triple(island[0]) == (with_["top1_agreement"], with_["max_abs_dlogit"],
                                 export["labels_top1"]["ORT fp16"] - export["labels_top1"]["ORT fp32"])
    assert triple(island[1])[:2] == (without["top1_agreement"], without["max_abs_dlogit"])

    for title, name in (("int8 for TensorRT (fp16 graph + Q/DQ)", f"{MODEL}.calib.json"),
                        ("int8 for ONNX Runtime CPU", f"{MODEL}.calib-cpu.json")):
        acc = _step_json(model_dir, name)["accuracy"]
        rows = {r["measurement"].split()[0]: r for r in d[title]["rows"]}
        assert sorted(rows) == ["entropy", "max", "percentile"]
        for method, r in rows.items():
            a = acc[f"int8-{method}"]
            assert triple(r) == (a["top1_agreement"], a["max_abs_dlogit"], -a["top1_drop"])

    parity = _step_json(model_dir, f"parity-{MODEL}.json")
    ran = [b for b in parity["backends"] if "top1" in b]
    def key(b):
        return b["name"], b["top1"], b.get("top1_agreement"), b.get("max_abs_dlogit")

    assert [key(b) for b in s["checks"]["parity"]["backends"]] == [key(b) for b in ran]
    assert s["checks"]["parity"]["verdict"] == parity["verdict"]
    for prec in ("fp16", "int8", "int8-cpu"):
        fb = _step_json(model_dir, f"layers-{MODEL}-{prec}.json")["result"]["first_bad"]
        got = {r["runner"]: r["first_past_tolerance"] for r in s["checks"]["layers"] if r["precision"] == prec}
        assert got == {k: (v or {}).get("module") for k, v in fb.items()}


@pytest.mark.slow
def test_rerun_skips_every_step_and_rewrites_nothing(first_run, inputs, capsys):
    out = inputs["base"] / "out"
    logs = {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    reports = {p: p.stat().st_mtime_ns for p in (out / "model").glob("*.json")}
    capsys.readouterr()
    rc = E.main(_argv(inputs, "--no-fail", "--verbose"))  # progress bars on: the same steps, not new ones
    printed = capsys.readouterr().out
    assert rc == 0
    for step in E.STEPS:
        if step != "calib-fp8" or "fp8" in E.calib_precisions():
            assert re.search(rf"\] {re.escape(step)}: (ok|threshold): up to date", printed), printed
    assert "python -m" not in printed  # no stage command was started
    assert E.step_key(["m", "--threads", "1", "--no-progress", "--x"], "s") == E.step_key(["m", "--x"], "s")
    assert E.step_key(["m", "--x"], "s") != E.step_key(["m", "--x"], "t")  # another checkpoint: another result
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs
    assert {p: p.stat().st_mtime_ns for p in (out / "model").glob("*.json")} == reports
    again = json.loads((inputs["base"] / "reports" / f"{NAME}.json").read_text())
    assert again["decisions"] == first_run[1]["decisions"]


@pytest.mark.slow
def test_a_newer_input_reruns_its_consumer(first_run, inputs, capsys):
    """fp32.onnx made newer: layers-fp16 (selected) runs again; calib, also reading it, is stale and not selected."""
    model_dir = inputs["base"] / "out" / "model"
    fp32 = model_dir / f"{MODEL}.fp32.onnx"
    later = time.time() + 5
    os.utime(fp32, (later, later))
    log = inputs["base"] / "out" / "logs" / "layers-fp16.log"
    before = log.stat().st_mtime_ns
    capsys.readouterr()
    E.main(_argv(inputs, "--only", "layers-fp16", "--no-fail"))
    printed = capsys.readouterr().out
    assert "layers-fp16: python -m evaluation.layerwise" in printed and log.stat().st_mtime_ns > before
    assert "calib-tensorrt: not run: not in --only and no up-to-date earlier run" in printed
    assert "onnx: ok: earlier run (not in --only)" in printed
    s = json.loads((inputs["base"] / "reports" / f"{NAME}.json").read_text())
    assert {x["decision"]: x["verdict"] for x in s["decisions"]}["int8 for ONNX Runtime CPU"] == "not measured"


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = [
        (["--checkpoint", str(tmp_path / "none.pth"), "--data", str(tmp_path)], "CHECKPOINT= (--checkpoint)"),
        (["--checkpoint", __file__, "--data", str(tmp_path / "nowhere")], "DATA= (--data)"),
    ]
    for extra, flag in cases:
        proc = subprocess.run([sys.executable, "-m", "evaluation.evidence", "--model", MODEL, "--out",
                               str(tmp_path / "out"), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evaluation.evidence: error: " + flag), lines
    assert not (tmp_path / "out").exists()  # nothing written


def test_make_target_without_checkpoint_or_calib_data(tmp_path, capsys):
    proc = subprocess.run(["make", "-s", "--no-print-directory", "precision-evidence", f"MODEL={MODEL}",
                           f"DATA={tmp_path}", f"OUT={tmp_path / 'out'}", f"PYTHON={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "evaluation.evidence: error: CHECKPOINT= (--checkpoint) is required" in proc.stderr.splitlines()[0]
    # in process: the calib steps need CALIB_DATA, an unknown step name is refused
    assert E.main(["--model", MODEL, "--checkpoint", __file__, "--data", str(tmp_path)]) == 2
    assert E.main(["--model", MODEL, "--checkpoint", __file__, "--data", str(tmp_path), "--only", "onnx,lint"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("evaluation.evidence: error: CALIB_DATA= (--calib-data)")
    assert err[1].startswith("evaluation.evidence: error: --only (ONLY=): unknown steps ['lint']")


@pytest.mark.slow
def test_sigterm_stops_the_running_child(inputs, tmp_path):
    argv = [a for a in _argv(inputs) if a != "--in-process"]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    argv[argv.index("--report-dir") + 1] = str(tmp_path / "reports")
    proc = subprocess.Popen([sys.executable, "-m", "evaluation.evidence", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = tmp_path / "out" / "logs" / "onnx.log"
        deadline = time.time() + 90
        while not log.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert log.is_file(), "the onnx step never started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if "evaluation.evidence:" in ln] == [
        next(ln for ln in err.splitlines() if ln.startswith("evaluation.evidence: interrupted (SIGTERM)"))]
    pid = int(re.search(r"stopped the running step `onnx` \(pid (\d+)\)", out).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "out" / "evidence-state.json").exists()  # the stopped step is not recorded as done


def test_the_fp8_slot_runs_once_calib_offers_fp8(inputs, monkeypatch):
    """Detected from calib's parser: without --precision fp8 the step is skipped with the reason; with it, planned."""
    args = E.get_args_parser().parse_args(_argv(inputs))
    fp8 = next(s for s in E.plan_evidence(args).steps if s.name == "calib-fp8")
    if "fp8" not in E.calib_precisions():
        assert fp8.unavailable == "make calib PRECISION=fp8 not available (calibration.calib has no --precision fp8)"
    real = E.calib_cli.get_args_parser

    def with_fp8(add_help: bool = True):
        p = real(add_help)
        if "--precision" not in p._option_string_actions:
            p.add_argument("--precision", choices=("int8", "fp8"), default="int8")
        return p

    monkeypatch.setattr(E.calib_cli, "get_args_parser", with_fp8)
    assert "fp8" in E.calib_precisions()
    fp8 = next(s for s in E.plan_evidence(args).steps if s.name == "calib-fp8")
    assert fp8.unavailable == "" and fp8.cmd[0] == "calibration.calib"
    assert fp8.cmd[fp8.cmd.index("--precision") + 1] == "fp8" and "--report" in fp8.cmd
