"""Re-running an interrupted ``make train`` (issue 24, item 5): the same command resumes the run in its folder
instead of starting over on top of its checkpoints; best.pth is only ever replaced by a better epoch; a folder
holding another run's last.pth, or a best.pth without last.pth, is refused with one line and exit 2."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2t_vit.checkpoint import read_checkpoint
from train import train as train_mod

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for ci, c in enumerate(("n01440764", "n02102040")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
                arr[..., ci] += 120
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "t2t_vit_test", "--data", str(data), "--out", str(out), "--img-size", "32", "--batch-size", "8",
            "--workers", "0", "--threads", "1", "--epochs", "3", "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--seed", "1", "--model-ema-decay", "0.9", "--stop-after", "1", *extra]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _epochs(out: Path) -> list[str]:
    return [ln.split(",")[0] for ln in (out / "summary.csv").read_text().splitlines()[1:]]


def test_rerunning_the_same_command_resumes_and_keeps_the_better_best(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = _cmd(dataset, out)  # --stop-after 1: each invocation trains one epoch, like an interrupted run
    assert train_mod.main(cmd) == 0
    first = read_checkpoint(out / "last.pth")
    assert first["epoch"] == 0 and (out / "best.pth").is_file()
    # Make the recorded best unbeatable: a fresh start would overwrite best.pth with its first epoch.
    first["best"]["top1"] = 101.0
    torch.save(first, out / "last.pth")
    best_before = _sha(out / "best.pth")
    capsys.readouterr()

    assert train_mod.main(cmd) == 0  # the very same command
    err = capsys.readouterr().err
    assert "already holds this run's last.pth (epoch 1 of 3): resuming it" in err
    again = read_checkpoint(out / "last.pth")
    assert again["epoch"] == 1 and again["num_updates"] == 2 * first["num_updates"]  # continued, not restarted
    assert _epochs(out) == ["1", "2"]
    assert _sha(out / "best.pth") == best_before and again["best"]["top1"] == 101.0

    assert train_mod.main(cmd) == 0 and train_mod.main(cmd) == 0  # the last epoch, then nothing left to train
    assert read_checkpoint(out / "last.pth")["epoch"] == 2 and _epochs(out) == ["1", "2", "3"]


@pytest.mark.parametrize("change,named", [(["--model", "t2t_vit_t_test"], "model t2t_vit_test there, t2t_vit_t_test here"),
                                          (["--lr", "0.01"], "lr 0.001 there, 0.01 here"),
                                          (["--epochs", "5"], "epochs 3 there, 5 here")])
def test_another_runs_last_pth_is_refused(dataset, tmp_path, capsys, change, named):
    out = tmp_path / "run"
    assert train_mod.main(_cmd(dataset, out)) == 0
    before = {f: _sha(out / f) for f in ("last.pth", "best.pth", "summary.csv")}
    capsys.readouterr()
    assert train_mod.main(_cmd(dataset, out) + change) == 2  # argparse: the later flag wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert f"--resume {out / 'last.pth'}" in err[0] and "RUN_DIR" in err[0]
    assert {f: _sha(out / f) for f in before} == before  # nothing touched


def test_best_without_last_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(_cmd(dataset, out)) == 0
    (out / "last.pth").unlink()
    best = _sha(out / "best.pth")
    capsys.readouterr()
    assert train_mod.main(_cmd(dataset, out)) == 2
    err = capsys.readouterr().err
    assert "holds best.pth but no last.pth" in err and "RUN_DIR" in err
    assert _sha(out / "best.pth") == best


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_sigterm_then_the_same_command_continues(dataset, tmp_path):
    """The issue's sequence through the CLI: `make train` stopped by a signal (exit 2, its message says to run the
    command again), then the same command: it continues after the last finished epoch, no epoch twice."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.train", *_cmd(dataset, out)[:-2], "--epochs", "40", "--stop-after", "3"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 150
        while not (out / "last.pth").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    done = read_checkpoint(out / "last.pth")["epoch"] + 1  # epochs finished before the signal
    assert 1 <= done < 3
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"holds this run's last.pth (epoch {done} of 40): resuming it" in r.stderr
    assert _epochs(out) == [str(e) for e in range(1, done + 4)]
    assert read_checkpoint(out / "last.pth")["epoch"] == done + 2
