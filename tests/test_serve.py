"""A real Triton server (PyTriton's bundled tritonserver in .venv-triton) on 127.0.0.1: answers over HTTP
and gRPC like the runner called directly, refuses malformed requests and keeps serving, survives nothing
when killed but leaves no client hanging, restarts, and refuses a busy port. Every server is stopped by
the test that started it (process group, also on failure); request loops are bounded in count and time."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.engine_helpers import REPO, data_meta, write_onnx

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: make install")
from serving import loadtest as L  # noqa: E402
from serving.process import ServerProcess, triton_python  # noqa: E402
from t2t_vit.errors import T2TError  # noqa: E402

MODEL = "t2t_vit_test"
WNIDS = ["n01440764", "n02102040", "n02979186"]
OVERSIZED = "over the 16777216-byte limit"
pytestmark = pytest.mark.slow


def _triton_python() -> Path:
    try:
        return triton_python()
    except T2TError as e:
        pytest.skip(f"the Triton server cannot run here: {e}")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    meta = {"model": MODEL, "precision": "fp32", "num_classes": "3", "class_names": json.dumps(WNIDS), **data_meta(64)}
    return write_onnx(folder / f"{MODEL}.fp32.onnx", metadata=meta)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    _triton_python()
    srv = ServerProcess(artifact, max_batch_size=8, log=tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.start()
    finally:
        srv.stop()


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def _direct(x: np.ndarray, artifact: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def test_http_and_grpc_answer_like_the_runner(server, artifact):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    # The served runner's ONNX Runtime pool does not spin by default (docs/serving.md).
    assert "spinning off" in server.log.read_text()
    x = _batch(3)
    h = http.InferenceServerClient(server.http_url, network_timeout=30)
    inp = http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(h.infer(MODEL, [inp]).as_numpy("logits"), _direct(x, artifact), atol=1e-6)
    g = grpc.InferenceServerClient(server.grpc_url)
    ginp = grpc.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    np.testing.assert_allclose(g.infer(MODEL, [ginp], client_timeout=30).as_numpy("logits"), _direct(x, artifact),
                               atol=1e-6)
    # The image endpoint: JPEG bytes -> the artifact's eval transform -> the same logits as predict's path.
    img = Image.fromarray((np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    b = http.InferInput("IMAGE", [1, 1], "BYTES")
    b.set_data_from_numpy(np.array([[buf.getvalue()]], dtype=np.object_))
    from t2t_vit.data import DataConfig

    want = _direct(DataConfig.from_metadata(data_meta(64)).eval_transform()(img)[None].numpy(), artifact)
    np.testing.assert_allclose(h.infer(f"{MODEL}-classify", [b]).as_numpy("logits"), want, atol=1e-5)


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    h = http.InferenceServerClient(server.http_url, network_timeout=30)

    def send(model, name, arr, dtype):
        inp = http.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        return h.infer(model, [inp])

    cases = {
        "wrong shape": (MODEL, "input", _batch(1)[:, :, :32, :32], "FP32", "unexpected shape"),
        "wrong dtype": (MODEL, "input", _batch(1).astype(np.float64), "FP64", "data-type"),
        "oversized batch": (MODEL, "input", _batch(9), "FP32", "batch-size must be <= 8"),
        "not an image": (f"{MODEL}-classify", "IMAGE", np.array([[b"\x00GIF89 not really"]], dtype=np.object_),
                         "BYTES", "not a decodable image"),
    }
    for what, (model, name, arr, dtype, needle) in cases.items():
        with pytest.raises(InferenceServerException, match=needle):
            send(model, name, arr, dtype)
        assert send(MODEL, "input", _batch(1), "FP32").as_numpy("logits").shape == (1, 3), f"after {what}"
    # An image upload over the server's limit (16 MiB) is refused before decoding; serving goes on.
    with pytest.raises(InferenceServerException, match=OVERSIZED):
        send(f"{MODEL}-classify", "IMAGE", np.array([[b"\0" * (17 << 20)]], dtype=np.object_), "BYTES")
    assert send(MODEL, "input", _batch(1), "FP32").as_numpy("logits").shape == (1, 3)


def test_a_second_server_on_a_busy_port_says_so_in_one_line(server, artifact):
    proc = subprocess.run([str(_triton_python()), "-m", "serving.server", "--artifact", str(artifact),
                           "--http-port", str(server.http_port), "--grpc-port", str(server.grpc_port)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("serving.server: error: 127.0.0.1:") and "in use" in lines[0]
    proc = subprocess.run(["make", "-s", "serve", f"ARTIFACT={artifact}", f"HTTP_PORT={server.http_port}",
                           f"GRPC_PORT={server.grpc_port}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already in use" in proc.stderr


def test_load_levels_batches_cpu_and_the_goal(server, artifact, tmp_path):
    """The load test's parts on the running server: every request answered, Triton's batch counts add up
    to the requests, the client's and the server's CPU time are counted, and the goal check reads the
    direct runner timed around the level."""
    args = L.get_args_parser().parse_args(["--model", MODEL, "--requests", "24", "--max-seconds", "20",
                                           "--timeout", "10"])
    levels = []
    for proto, c in (("http", 1), ("grpc", 4)):
        res = L.run_level(server, proto, MODEL, _batch(1), c, args)
        assert res.sent == res.ok == 24 and not res.errors and len(res.latencies_s) == 24
        assert sum(b * n for b, n in res.batches.items()) == 24  # Triton executed exactly these images
        # 24 requests cost the client and the server some CPU, and no more than all cores for the whole level.
        assert 0 < res.client_cpu_s < res.wall_s * 2 * os.cpu_count()
        assert res.server_cpu_s is not None and 0 < res.server_cpu_s < res.wall_s * 2 * os.cpu_count()
        assert "tritonserver" in res.server_cpu_by_process and res.server_cpu_by_process["python"] > 0
        levels.append(res)
    assert levels[0].batches == {1: 24}  # one client: nothing to batch
    runners = L.direct_runners(artifact, 1, False)
    assert [(k, r.spinning) for k, r in runners.items()] == [("no-spin", False), ("spin", True)]
    with runners["no-spin"], runners["spin"]:
        pre = L.time_direct(runners, [1, 2], 64, 0.05)
        post = L.time_direct(runners, sorted({1, 2} | set(levels[1].batches)), 64, 0.05)
    assert all(len(pre[k][b]["s"]) == len(pre[k][b]["cpu"]) >= 3 for k in runners for b in (1, 2))
    d = L.direct_summary(pre, post)
    best = max(v for rows in d["img_s"].values() for v in rows.values())
    assert d["best_img_s"] == best and d["img_s"][d["best_setting"]][str(d["best_batch"])] == best
    same = L.same_batches(d, levels[1].batches)
    assert 0 < same["img_s"] <= best * 1.0001  # a mix of sizes is never faster than the best size
    assert same["cpu_s_per_img"] > 0 and same["setting"] in runners
    # One batch size: the same-batches numbers are that size's own.
    one = L.same_batches(d, {2: 5})
    assert one["img_s"] == max(d["img_s"][k]["2"] for k in runners)
    assert one["cpu_s_per_img"] == d["cpu_s_per_img"][one["setting"]]["2"]
    assert L.same_batches(L.direct_summary(pre), {3: 1}) is None  # batch 3 never timed: no estimate
    rows = [lv.summary() for lv in levels]
    for row in rows:
        row["direct"] = {**d, "best_img_s": 1e-3}
    assert L.judge(rows, 0.9) == []
    rows[1]["direct"] = {**d, "best_img_s": 1e9}
    assert "grpc c=4" in L.judge(rows, 0.9)[0] and len(L.judge(rows, 0.9)) == 1  # only the top concurrency


def test_server_killed_during_load_then_restarted(artifact, tmp_path):
    _triton_python()
    srv = ServerProcess(artifact, log=tmp_path / "a.log")
    again = ServerProcess(artifact, ports=(srv.http_port, srv.grpc_port), log=tmp_path / "b.log")
    try:
        srv.start()
        out = {}
        load = threading.Thread(target=lambda: out.setdefault("r", L.drive("http", srv.http_url, MODEL, _batch(1),
                                                                            4, 100_000, 6, 5)))
        t0 = time.monotonic()
        load.start()
        time.sleep(2.0)
        srv.kill()
        load.join(timeout=60)
        assert not load.is_alive(), "the load test hung after the server died"
        res = out["r"]
        assert res.ok > 0 and res.errors, (res.ok, res.errors[:3])
        assert len(res.latencies_s) == res.sent  # every request sent has its response or its error
        assert max(res.latencies_s) < 5 + 2 and time.monotonic() - t0 < 40
        again.start()
        assert L.drive("grpc", again.grpc_url, MODEL, _batch(1), 2, 10, 20, 10).ok == 10
    finally:
        srv.stop()
        again.stop()


def test_loadtest_command_writes_the_report_and_exits_1_on_a_missed_goal(artifact, tmp_path, capsys):
    """The whole command on the tiny graph: its direct runner is far faster than any served request, so the
    goal is missed (exit 1) after the report is written; every request is still answered."""
    _triton_python()
    rc = L.main(["--model", MODEL, "--artifact", str(artifact), "--out", str(tmp_path), "--concurrency", "1,3",
                 "--requests", "12", "--max-seconds", "10", "--direct-seconds", "0.1", "--threads", "1",
                 "--max-batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "serving.loadtest: FAIL: " in err and "x the direct runner" in err
    report = json.loads((tmp_path / f"serve-{MODEL}.json").read_text())
    assert [(lv["protocol"], lv["concurrency"], lv["ok"], lv["errors"]) for lv in report["levels"]] == \
        [("http", 1, 12, 0), ("http", 3, 12, 0), ("grpc", 1, 12, 0), ("grpc", 3, 12, 0)]
    assert report["goal_missed"] and report["served_setting"] == "no-spin"
    for when in ("before", "after"):  # the sweep: both spinning settings at every batch size
        assert {k: sorted(v) for k, v in report["direct"][when]["img_s"].items()} == \
            {"no-spin": ["1", "2", "4"], "spin": ["1", "2", "4"]}
    for lv in report["levels"]:
        assert sum(int(b) * n for b, n in lv["batch_sizes"].items()) == 12
        # The direct runner around each level: every power of two and every size Triton formed.
        assert set(lv["direct"]["img_s"]["no-spin"]) == {"1", "2", "4"} | set(lv["batch_sizes"])
        assert lv["direct"]["same_batches"]["img_s"] > 0 and lv["client_cpu_s_per_img"] > 0
        assert lv["server_cpu_s_per_img"] > 0 and len(lv["load_average"]) == 2
    md = (tmp_path / f"serve-{MODEL}.md").read_text()
    for column in ("vs direct around (goal)", "vs direct on the same batches", "vs direct sweep best",
                   "client CPU ms/img", "server CPU ms/img", "server by process", "same batches", "no-spin before",
                   "spin after"):
        assert column in md
    assert (tmp_path / f"serve-{MODEL}.png").is_file()


def test_loadtest_refuses_negative_timing_seconds_in_one_line(artifact, tmp_path, capsys):
    rc = L.main(["--model", MODEL, "--artifact", str(artifact), "--out", str(tmp_path), "--level-direct-seconds", "-1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("serving.loadtest: error: --direct-seconds and "
                                                           "--level-direct-seconds")
    assert not list(tmp_path.iterdir())  # nothing written


def test_preferred_batch_sizes_stop_at_the_direct_runners_best():
    from serving.loadtest import preferred_sizes
    from serving.server import _batch_list
    from t2t_vit.errors import T2TError

    assert preferred_sizes("auto", {"best_batch": 8}, 32) == [2, 4, 8]
    assert preferred_sizes("auto", {"best_batch": 1}, 32) == [2]  # batching still possible
    assert preferred_sizes("auto", {"best_batch": 64}, 16) == [2, 4, 8, 16]
    assert preferred_sizes("all", {}, 32) == [2, 4, 8, 16, 32]
    assert preferred_sizes("8,4", {}, 32) == [4, 8]
    for bad in ("0,4", "64", "x"):
        with pytest.raises(T2TError, match="--preferred-batch-size"):
            preferred_sizes(bad, {}, 32)
    assert _batch_list("8,2,8") == [2, 8]
    with pytest.raises(argparse.ArgumentTypeError):
        _batch_list("0")
