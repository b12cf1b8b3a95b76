"""trtexec: command assembly for TensorRT 10.x vs 11.x, the summary parser, and the log CLI.

The logs in tests/data/trtexec/ are hand-written from the format documented in the trtexec section of NVIDIA's
TensorRT documentation
(8.2/8.4 one-percentile summaries, 8.2's End-to-End line, 10.x/11.x three-percentile summaries,
scientific notation, [W] lines, a failed run without a summary). Expected values are read from the
fixture text: literals copied from it, and a deliberately naive split-based reader below.
"""
from __future__ import annotations

import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engines.trtexec import (SAME_MEASUREMENT_FLAGS_10, TimingBudget, TrtexecError, find_trtexec, run_trtexec,
                             trtexec_command, trtexec_version)
from engines.trtexec_log import (TrtexecLogError, batch_from_command, main as log_main, parse_log_file,
                                 parse_summary, version_from_log)

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "tests" / "data" / "trtexec"
SUMMARY_LOGS = ["trt84_one_percentile.log", "trt82_end_to_end.log", "trt10_three_percentiles.log",
                "trt11_defaults.log", "scientific_notation.log", "trt8_no_latency_line.log"]
STAT_KEYS = {"Latency": "latency_ms", "Enqueue Time": "enqueue_ms", "H2D Latency": "h2d_ms",
             "GPU Compute Time": "gpu_compute_ms", "D2H Latency": "d2h_ms",
             "End-to-End Host Latency": "end_to_end_host_latency_ms"}


def naive_summary(text: str) -> dict:
    """An independent, simple reading of the fixture summaries: split on '] ', ': ', ', ' and ' = '."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.endswith("=== Performance summary ==="))
    out: dict = {"stats": {}, "warnings": 0}
    for line in lines[start + 1:]:
        if line.startswith("&&&&") or "===" in line:
            break
        if "[W]" in line:
            out["warnings"] += 1
            continue
        body = line.split("] ")[-1]
        if ": " not in body:
            continue
        name, rest = body.split(": ", 1)
        if name == "Throughput":
            out["qps"] = float(rest.split()[0])
        elif name.startswith("Total "):
            out[name] = float(rest.split()[0])
        elif name in STAT_KEYS:
            stats = {}
            for part in rest.split(", "):
                key, value = part.split(" = ")
                if key.startswith("percentile("):
                    key = "p" + key[len("percentile("):-len("%)")]
                stats[key] = float(value.split()[0])
            out["stats"][STAT_KEYS[name]] = stats
    return out


# ----------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUMMARY_LOGS)
def test_parser_agrees_with_naive_reading(name):
    text = (LOGS / name).read_text()
    expect = naive_summary(text)
    got = parse_summary(text)
    assert got["throughput_qps"] == pytest.approx(expect["qps"], rel=1e-12)
    assert got["total_host_walltime_s"] == pytest.approx(expect["Total Host Walltime"], rel=1e-12)
    assert got["total_gpu_compute_s"] == pytest.approx(expect["Total GPU Compute Time"], rel=1e-12)
    assert expect["stats"], "fixture has no statistics lines"
    for key, stats in expect["stats"].items():
        parsed = got[key]
        for stat_name, value in stats.items():
            assert parsed[stat_name] == pytest.approx(value, rel=1e-12), (key, stat_name)
        # percentiles trtexec did not print stay None rather than being invented
        for p in ("p90", "p95", "p99"):
            if p not in stats:
                assert parsed[p] is None
    assert len(got["warnings"]) == expect["warnings"]
    assert got["images_per_s"] == pytest.approx(got["throughput_qps"] * got["batch"], rel=1e-12)


def test_trt84_one_percentile_values():
    s = parse_log_file(LOGS / "trt84_one_percentile.log")
    assert s["tensorrt_version"] == "8.4.1"
    assert s["batch"] == 8
    assert s["throughput_qps"] == 812.345
    assert s["images_per_s"] == pytest.approx(812.345 * 8)
    assert s["latency_ms"] == {"min": 1.1875, "max": 1.5332, "mean": 1.2214, "median": 1.2168,
                               "p90": None, "p95": None, "p99": 1.3105}
    assert s["gpu_compute_ms"]["median"] == 1.2151
    assert s["percentiles"] == ["p99"]
    assert s["warnings"][0].startswith("* Throughput may be bound by Enqueue Time")
    assert s["warnings"][1].startswith("If not already in use, --useCudaGraph")


def test_trt82_end_to_end_line_is_kept_apart_from_latency():
    s = parse_log_file(LOGS / "trt82_end_to_end.log")
    assert s["tensorrt_version"] == "8.2.5"
    assert s["latency_ms"]["mean"] == 2.6312
    assert s["end_to_end_host_latency_ms"]["mean"] == 2.6903
    assert s["end_to_end_host_latency_ms"]["p99"] == 3.3989
    assert s["h2d_ms"]["max"] == 0.0921
    assert s["warnings"] == []


def test_trt10_three_percentiles_and_verbose_explanations_ignored():
    s = parse_log_file(LOGS / "trt10_three_percentiles.log")
    assert s["tensorrt_version"] == "10.13.3"
    assert s["batch"] == 32
    assert s["images_per_s"] == pytest.approx(1523.77 * 32)
    assert (s["latency_ms"]["p90"], s["latency_ms"]["p95"], s["latency_ms"]["p99"]) == (0.6641, 0.6689, 0.6934)
    assert s["enqueue_ms"]["p95"] == 0.0041
    assert s["percentiles"] == ["p90", "p95", "p99"]
    # the verbose "Throughput: the observed throughput ..." explanation must not overwrite the number
    assert s["throughput_qps"] == 1523.77
    assert len(s["warnings"]) == 2 and "coefficient of variance = 2.41%" in s["warnings"][0]
    assert "--useCudaGraph" in s["command"] and "--exportTimes=" in s["command"]


def test_trt11_defaults():
    s = parse_log_file(LOGS / "trt11_defaults.log")
    assert s["tensorrt_version"] == "11.4.0"
    assert s["batch"] == 128
    assert s["images_per_s"] == pytest.approx(205.125 * 128)
    assert s["gpu_compute_ms"]["p99"] == 5.0013
    assert s["total_gpu_compute_s"] == 9.99911
    assert "--useCudaGraph" not in s["command"]


def test_scientific_notation_and_short_prefix():
    s = parse_log_file(LOGS / "scientific_notation.log")
    assert s["tensorrt_version"] == "10.3.0"
    assert s["throughput_qps"] == pytest.approx(12345.6)
    assert s["latency_ms"]["max"] == pytest.approx(0.12)  # written 1.2E-01
    assert s["latency_ms"]["p95"] == pytest.approx(0.09)  # written 9e-02
    assert s["total_host_walltime_s"] == pytest.approx(3.0012)  # written 3.0012E+00
    assert s["warnings"] == ["* Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized."]


def test_no_summary_fails_loudly_with_the_errors():
    with pytest.raises(TrtexecLogError) as e:
        parse_log_file(LOGS / "no_summary.log")
    msg = str(e.value)
    assert "no_summary.log" in msg and "Performance summary" in msg
    assert "Inference set up failed" in msg


def test_partial_summaries_parse_what_is_there():
    head = "[01/01/2025-00:00:00] [I] === Performance summary ===\n"
    only_throughput = parse_summary(head + "[01/01/2025-00:00:00] [I] Throughput: 10 qps\n", batch=2)
    assert only_throughput["throughput_qps"] == 10 and only_throughput["images_per_s"] == 20
    assert only_throughput["latency_ms"] is None and only_throughput["gpu_compute_ms"] is None
    short = parse_summary(head + "[I] Throughput: 10 qps\n[I] Latency: min = 1 ms, max = 2 ms\n")
    assert short["latency_ms"] == {"min": 1.0, "max": 2.0, "mean": None, "median": None, "p90": None, "p95": None,
                                   "p99": None}
    garbled = parse_summary(head + "[I] Latency: min = ?? ms\n[I] GPU Compute Time: min = 1 ms, max = 3 ms\n")
    assert garbled["latency_ms"] is None and garbled["gpu_compute_ms"]["max"] == 3.0
    assert any("unreadable 'Latency'" in w for w in garbled["warnings"])


def test_summary_without_latency_line_from_trt8():
    s = parse_log_file(LOGS / "trt8_no_latency_line.log")
    assert s["tensorrt_version"] == "8.6.1" and s["batch"] == 16
    assert s["latency_ms"] is None and s["h2d_ms"] is None and s["d2h_ms"] is None
    assert s["throughput_qps"] == 188.25 and s["images_per_s"] == pytest.approx(188.25 * 16)
    assert s["gpu_compute_ms"]["median"] == 5.3037 and s["enqueue_ms"]["p99"] == 0.6733
    assert s["percentiles"] == ["p90", "p95", "p99"] and s["total_gpu_compute_s"] == 3.0158
    assert s["warnings"] == ["* GPU compute time is unstable, with coefficient of variance = 1.54%."]


def test_summary_without_metrics_fails():
    head = "[01/01/2025-00:00:00] [I] === Performance summary ===\n"
    with pytest.raises(TrtexecLogError, match="no metric"):
        parse_summary(head + "[I] Explanations of the performance metrics are printed in the verbose logs.\n")
    with pytest.raises(TrtexecLogError, match="Performance summary"):
        parse_summary("")


def test_batch_from_argument_and_command():
    text = (LOGS / "trt11_defaults.log").read_text()
    assert parse_summary(text, batch=4)["images_per_s"] == pytest.approx(205.125 * 4)
    no_shapes = "\n".join(l for l in text.splitlines() if not l.startswith("&&&&"))
    s = parse_summary(no_shapes)
    assert s["batch"] is None and s["images_per_s"] is None and s["command"] is None
    assert batch_from_command("trtexec --shapes=x:2x1,input:16x3x64x64", input_name="input") == 16
    assert batch_from_command("trtexec --loadEngine=a.engine") is None


@pytest.mark.parametrize("tag,version", [("v8401", "8.4.1"), ("v8205", "8.2.5"), ("v8601", "8.6.1"),
                                         ("v100300", "10.3.0"), ("v101303", "10.13.3"), ("v110400", "11.4.0")])
def test_version_tag_decoding(tag, version):
    assert version_from_log(f"&&&& RUNNING TensorRT.trtexec [TensorRT {tag}] # trtexec") == version


def test_log_cli_prints_json(capsys):
    assert log_main([str(LOGS / "trt10_three_percentiles.log"), "--batch", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 2 and out["images_per_s"] == pytest.approx(1523.77 * 2)
    assert log_main([str(LOGS / "no_summary.log")]) == 2  # bad input: one line, exit 2
    assert "Performance summary" in capsys.readouterr().err
    assert log_main([str(LOGS / "does_not_exist.log")]) == 2


def test_log_cli_as_module_named_in_readme():
    readme = (REPO / "README.md").read_text()
    assert "python -m engines.trtexec_log" in readme or "make trtexec-log" in readme
    proc = subprocess.run([sys.executable, "-m", "engines.trtexec_log", str(LOGS / "trt84_one_percentile.log")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["latency_ms"]["median"] == 1.2168


# ----------------------------------------------------------------------------------------------------
# Command assembly
# ----------------------------------------------------------------------------------------------------
def _flag_values(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd[1:] if "=" in a)


@pytest.mark.parametrize("version,expect_flags", [("10.13.3.9", True), ("10.0.1", True), ("8.6.1", True),
                                                  ("11.0.0", False), ("11.4.0.106", False)])
def test_same_measurement_flags_by_version(version, expect_flags):
    cmd = trtexec_command("m.engine", 8, (3, 224, 224), version)
    for flag in ("--useCudaGraph", "--noDataTransfers", "--useSpinWait"):
        assert cmd.count(flag) == (1 if expect_flags else 0), (version, flag)
    assert set(SAME_MEASUREMENT_FLAGS_10) == {"--useCudaGraph", "--noDataTransfers", "--useSpinWait"}
    # 11.x gets its defaults: nothing that would undo them either
    assert "--noCudaGraph" not in cmd and "--includeDataTransfers" not in cmd


def test_command_shapes_engine_budget_and_export_times(tmp_path):
    cmd = trtexec_command(tmp_path / "m.engine", 32, (3, 384, 384), "11.4.0", input_name="input",
                          binary="/opt/trt/bin/trtexec", budget=TimingBudget(250, 5.0, 50),
                          export_times=tmp_path / "t.json", extra=["--verbose"])
    assert cmd[0] == "/opt/trt/bin/trtexec" and cmd[-1] == "--verbose"
    flags = _flag_values(cmd)
    assert flags["--loadEngine"] == str(tmp_path / "m.engine")
    assert flags["--shapes"] == "input:32x3x384x384"
    assert (flags["--warmUp"], flags["--duration"], flags["--iterations"]) == ("250", "5", "50")
    assert flags["--exportTimes"] == str(tmp_path / "t.json")
    assert batch_from_command(shlex.join(cmd)) == 32
    # no precision flags: precision is in the engine (strongly typed; the flags are gone in TensorRT 11)
    assert not any(a in cmd for a in ("--fp16", "--int8", "--best"))
    with pytest.raises(ValueError):
        trtexec_command("m.engine", 0, (3, 224, 224), "10.13.3")


# ----------------------------------------------------------------------------------------------------
# Running trtexec (a stand-in script replays a fixture log: this tests our plumbing, not TensorRT)
# ----------------------------------------------------------------------------------------------------
FAKE = """#!{python}
import os, sys
if "--help" in sys.argv:
    print("&&&& RUNNING TensorRT.trtexec [TensorRT v101303] # trtexec --help")
    sys.exit(0)
text = open(os.environ["FAKE_TRTEXEC_LOG"]).read()
first, rest = text.split("\\n", 1)
print("&&&& RUNNING TensorRT.trtexec [TensorRT v101303] # " + " ".join(sys.argv))
print(rest)
sys.exit(int(os.environ.get("FAKE_TRTEXEC_RC", "0")))
"""


@pytest.fixture
def fake_trtexec(tmp_path, monkeypatch):
    path = tmp_path / "bin" / "trtexec"
    path.parent.mkdir()
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_TRTEXEC_LOG", str(LOGS / "trt10_three_percentiles.log"))
    return path


def test_run_trtexec_saves_log_and_records_command(fake_trtexec, tmp_path, monkeypatch):
    assert trtexec_version(str(fake_trtexec)) == "10.13.3"
    cmd = trtexec_command("m.engine", 32, (3, 224, 224), "10.13.3", binary=str(fake_trtexec))
    log = tmp_path / "out" / "run.log"
    s = run_trtexec(cmd, log, batch=32)
    assert s["command"] == shlex.join(cmd)
    assert log.is_file() and "=== Performance summary ===" in log.read_text()
    assert s["images_per_s"] == pytest.approx(1523.77 * 32)

    monkeypatch.setenv("FAKE_TRTEXEC_LOG", str(LOGS / "no_summary.log"))
    monkeypatch.setenv("FAKE_TRTEXEC_RC", "1")
    with pytest.raises(TrtexecError, match="exited with 1"):
        run_trtexec(cmd, tmp_path / "out" / "fail.log", batch=32)
    assert (tmp_path / "out" / "fail.log").is_file()  # kept for reading
    monkeypatch.setenv("FAKE_TRTEXEC_RC", "0")
    with pytest.raises(TrtexecError, match="Performance summary"):
        run_trtexec(cmd, tmp_path / "out" / "fail2.log", batch=32)


def test_find_trtexec(fake_trtexec, monkeypatch):
    monkeypatch.setenv("TRTEXEC", str(fake_trtexec))
    assert find_trtexec() == str(fake_trtexec)
    monkeypatch.delenv("TRTEXEC")
    monkeypatch.setenv("PATH", str(fake_trtexec.parent.parent / "empty"))
    with pytest.raises(TrtexecError, match="TRTEXEC=/path/to/trtexec"):
        find_trtexec()
