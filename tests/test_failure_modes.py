"""What a new user hit (issue 12), each reproduced: stopped parents and their children, a full disk, wrong
arguments, messages that name the user's own flag, suspicious labels, two runs on one folder."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.image_helpers import noise_images

REPO = Path(__file__).resolve().parents[1]


def _procs_with(marker: str) -> list[int]:
    """pids of processes whose command line contains ``marker`` (from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if marker in cmd and "Z" not in state.split()[1:2]:  # zombies are dead already
            pids.append(int(d.name))
    return pids


def _wait(cond, timeout: float, step: float = 0.2) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and Linux signals")


# ----------------------------------------------------------------------------------------------------
# 1. A stopped parent stops its children
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stopping_the_demo_stops_its_training_step(tmp_path):
    out = tmp_path / "demo-stop"
    demo = subprocess.Popen([sys.executable, "-m", "evaluation.demo", "--out", str(out), "--dataset", "digits",
                             "--model", "t2t_vit_test", "--epochs", "200", "--threads", "1", "--workers", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: _procs_with(f"train.train --model t2t_vit_test --img-size 32 --data {out}"), 120), \
            "the demo never started its training step"
        child = _procs_with(f"train.train --model t2t_vit_test --img-size 32 --data {out}")
        demo.send_signal(signal.SIGTERM)
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 2
    assert "stopped the running step `train`" in stdout and "interrupted (SIGTERM)" in stderr
    assert "Traceback" not in stderr
    assert _wait(lambda: not any(p in _procs_with("train.train") for p in child), 30), "training kept running"


@pytest.mark.timeout(60)
def test_sigkill_of_a_benchmark_parent_stops_its_case(tmp_path):
    marker = f"marker-{tmp_path.name}"
    parent = subprocess.Popen([sys.executable, "-c", (
        "from t2t_vit.timing import run_case_in_subprocess\n"
        f"run_case_in_subprocess('tests.timing_case', {{'value': 1, 'sleep': 60, 'tag': '{marker}'}})")], cwd=REPO)
    try:
        assert _wait(lambda: [p for p in _procs_with(marker) if p != parent.pid], 30), "the case never started"
        children = [p for p in _procs_with(marker) if p != parent.pid]
        parent.kill()  # SIGKILL: no Python cleanup runs in the parent; the kernel signals the child
        parent.wait()
        assert _wait(lambda: not any(p in _procs_with(marker) for p in children), 15), "the case outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_workers_stop_with_the_launcher(tmp_path):
    data = tmp_path / "data"
    noise_images(data / "train", per_class=8)
    noise_images(data / "val", per_class=2)
    run = tmp_path / "ddp-stop"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "train.train", "--model", "t2t_vit_test", "--img-size", "32", "--data",
                                 str(data), "--out", str(run), "--epochs", "500", "--batch-size", "2", "--workers", "0",
                                 "--device", "cpu", "--aa=", "--mixup", "0", "--cutmix", "0"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: (run / "summary.csv").is_file(), 120), "training did not get going"  # mid-training
        workers = [p for p in _procs_with(f"train.train --model t2t_vit_test --img-size 32 --data {data}")
                   if p != launcher.pid]
        launcher.kill()  # SIGKILL of the launcher: the workers must not train on under PID 1
        launcher.wait()
        assert _wait(lambda: not any(p in _procs_with("train.train") for p in workers), 30), "workers kept running"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in _procs_with(f"--data {data}"):
            os.kill(p, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------
# 2. Tracebacks become one line: EPOCHS=0, a full disk
# ----------------------------------------------------------------------------------------------------
def test_epochs_zero_is_one_line_and_makes_no_run_folder(tmp_path, capsys):
    from train import train as train_mod

    rc = train_mod.main(["--model", "t2t_vit_test", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                         "--epochs", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "AssertionError" not in err
    assert "--epochs must be at least 1" in err and "EPOCHS=" in err
    assert not (tmp_path / "run").exists()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.timeout(120)
def test_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "small"
    if not _tmpfs(disk, "192k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); test_contract.py injects ENOSPC instead")
    try:
        proc = subprocess.run([sys.executable, "-m", "export.to_onnx", "--model", "t2t_vit_test", "--out",
                               str(disk / "o"), "--val-images", "0", "--threads", "1"], cwd=REPO, capture_output=True,
                              text=True, timeout=100)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "no space left on the device" in proc.stderr
        assert [p.name for p in (disk / "o").iterdir()] in ([], ["t2t_vit_test.fp32.onnx"])  # no partial file
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.timeout(120)
def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path):
    disk = tmp_path / "small"
    if not _tmpfs(disk, "512k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    data = tmp_path / "data"
    noise_images(data / "train", per_class=8)
    noise_images(data / "val", per_class=2)
    try:
        proc = subprocess.run([sys.executable, "-m", "train.train", "--model", "t2t_vit_test", "--img-size", "32",
                               "--data", str(data), "--out", str(disk / "run"), "--epochs", "1", "--batch-size", "4",
                               "--workers", "0", "--threads", "1"], cwd=REPO, capture_output=True, text=True,
                              timeout=100)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "no space left on the device" in proc.stderr and re.search(r"(best|last)\.pth", proc.stderr)
        assert not [p for p in (disk / "run").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])


# ----------------------------------------------------------------------------------------------------
# 6. Messages that name the user's own input
# ----------------------------------------------------------------------------------------------------
def test_random_bytes_are_not_called_a_dangerous_pickle(tmp_path):
    from t2t_vit.checkpoint import CheckpointError, read_checkpoint

    junk = tmp_path / "weights.pth"
    junk.write_bytes(os.urandom(4096).replace(b"PK", b"xx").lstrip(b"\x80") or b"x")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint at all") as e:
        read_checkpoint(junk)
    assert "unpickle" not in str(e.value)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_checkpoint(tmp_path / "evil.pth")


def test_calibration_names_calib_data_and_calib_size(tmp_path, capsys):
    from calibration.calib import main

    base = ["--model", "t2t_vit_test", "--out", str(tmp_path / "o")]
    assert main(base + ["--calib-data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "CALIB_DATA (--calib-data)" in err and "missing" in err and "validation" not in err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--calib-data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "CALIB_DATA (--calib-data)" in err and "class sub-folders" in err
    data = noise_images(tmp_path / "train", per_class=4)
    assert main(base + ["--calib-data", str(data), "--calib-size", "0"]) == 2
    assert "CALIB_SIZE (--calib-size) must be a positive number" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# 7. Exit codes through make
# ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.timeout(240)
def test_make_turns_exit_1_into_2_and_the_direct_command_keeps_it(tmp_path):
    from export.to_onnx import export_model
    from t2t_vit.checkpoint import build_model

    out, data = tmp_path / "o", noise_images(tmp_path / "val", per_class=4)
    torch.manual_seed(0)
    export_model(build_model("t2t_vit_test"), out)
    args = ["--backends", "onnxruntime-cpu-fp32", "--min-agreement", "fp32=101", "--workers", "0", "--no-progress"]
    direct = subprocess.run([sys.executable, "-m", "evaluation.parity", "--model", "t2t_vit_test", "--out", str(out),
                             "--data", str(data), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert direct.returncode == 1, direct.stderr  # a threshold missed
    via_make = subprocess.run(["make", "parity", "MODEL=t2t_vit_test", f"OUT={out}", f"DATA={data}",
                               f"PYTHON={sys.executable}", "ARGS=" + " ".join(args)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert via_make.returncode == 2  # make's own code for any failed recipe


# ----------------------------------------------------------------------------------------------------
# 9. Smaller things
# ----------------------------------------------------------------------------------------------------
def test_two_commands_on_one_output_folder(tmp_path):
    from t2t_vit.files import OutputBusyError, OutputLock

    with OutputLock(tmp_path / "o", "first"):
        with OutputLock(tmp_path / "o", "nested in the same process"):  # re-entrant (calib exporting in-process)
            pass
        other = subprocess.run([sys.executable, "-c", (
            "import sys\nfrom t2t_vit.files import OutputLock, OutputBusyError\n"
            f"try:\n    OutputLock({str(tmp_path / 'o')!r}, 'second').__enter__()\n"
            "except OutputBusyError as e:\n    print(e); sys.exit(3)\n")], cwd=REPO, capture_output=True, text=True)
        assert other.returncode == 3 and "in use by pid" in other.stdout and "first" in other.stdout
    assert not (tmp_path / "o" / ".t2t-owner").exists()
    assert issubclass(OutputBusyError, Exception)


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    from t2t_vit.files import OutputLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pth.pid{dead.stdout.strip()}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".x.pid{os.getpid()}.def456.tmp"  # this process is alive: not touched
    live.write_bytes(b"in progress")
    with OutputLock(tmp_path):
        pass
    assert not stale.exists() and live.exists()


def test_failed_training_leaves_no_run_folder_and_prints_once(tmp_path, capsys):
    from train import train as train_mod

    data = noise_images(tmp_path / "data" / "train", per_class=4)
    rc = train_mod.main(["--model", "t2t_vit_test", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                         "--epochs", "1", "--workers", "0", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and data.is_dir()
    assert err.count("no 'val/' folder") == 1  # one line, not a log line plus a print
    assert not (tmp_path / "run").exists()


def test_parity_chart_labels_stay_inside_the_figure():
    from evaluation.parity import _chart

    report = {"model": "m", "passed": True, "data": {"images_evaluated": 10},
              "backends": [{"name": "pytorch-cpu-fp32", "status": "reference", "top1": 99.5},
                           {"name": "onnxruntime-cpu-int8", "status": "pass", "top1": 99.0, "delta_top1": -0.5,
                            "top1_agreement": 98.7}]}
    fig = _chart(report)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert all(t.get_window_extent(r).x1 <= ax.get_window_extent(r).x1 + 0.5 for t in ax.texts)


def test_demo_summary_wraps_reasons_at_word_boundaries():
    from evaluation.demo import render_summary

    reason = ("the TensorRT Python package is not installed: pip install -e '.[tensorrt]' (TensorRT >= 10.1 with "
              "its CUDA libraries, on a machine with an NVIDIA GPU; the trtexec binary ships in NVIDIA's packages)")
    text = render_summary({"model": "m", "img_size": 32, "dataset": "digits", "total_s": 60.0, "out": "/tmp/x",
                           "hardware": {"cpu": "CPU", "cpu_cores": 2},
                           "steps": [{"step": "engine", "status": "skipped", "seconds": 0.0, "reason": reason,
                                      "outputs": [], "log": None}], "metrics": {}})
    body = " ".join(ln.strip() for ln in text.splitlines())
    assert reason in body  # nothing cut: every word is there, in order
    assert all(len(ln) <= 100 for ln in text.splitlines() if ln.startswith("    "))
