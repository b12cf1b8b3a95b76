"""Load test of the Triton server against the same runner called directly (``make loadtest``).

::

    make loadtest MODEL=t2t_vit_7            # serves artifacts/t2t_vit_7/t2t_vit_7.fp32.onnx
    python -m serving.loadtest --model t2t_vit_7 --concurrency 1,4,16 --requests 400 --max-seconds 60

Plan -> execute -> report:

1. the direct runner (:class:`~t2t_vit.runners.OnnxRuntimeRunner` on the served file, same thread count),
   with the server's ONNX Runtime spinning setting and the other one, timed interleaved at each batch size
   up to the server's maximum, before the server starts and after it stops (the sweep);
2. a server (:class:`serving.process.ServerProcess`, Triton on free 127.0.0.1 ports) driven by
   ``tritonclient`` over HTTP and gRPC at each concurrency: that many client threads, one single-image
   request at a time each, until ``--requests`` are answered or ``--max-seconds`` pass, each request with a
   client timeout; Triton's statistics API before and after each level gives the batch sizes its dynamic
   batcher formed; the client's CPU time (this process) and the server's (its process group, per process)
   are counted over the level; the direct runner is timed again right before and right after each level
   (every size up to the maximum, and after it the sizes Triton formed);
3. ``<out>/serve-<model>.{json,md,png}``: throughput, latency p50/p95/p99, errors, batch sizes and CPU per
   image per protocol and concurrency, against the direct runner around the level (best size and setting;
   and on the same batches) and against the sweep's best (the earlier method).

Goal: at the highest concurrency, throughput >= ``--goal`` (0.9) x the direct runner at its best batch
size and spinning setting, timed around that level (median call of the repeats before and after it), and
every request answered; exit 1 when missed (the report is written first).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engines.backends import artifact_runner
from serving.process import ServerProcess
from t2t_vit.artifacts import default_out, onnx_path
from t2t_vit.cli import comma_list, resolve_threads, run_command
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.reports import host_line, markdown_table, pyplot, report_header, write_report
from t2t_vit.runners import OnnxRuntimeRunner
from t2t_vit.timing import latency_stats, load_average, time_interleaved

__all__ = ["LevelResult", "direct_runners", "time_direct", "direct_summary", "same_batches", "drive",
           "batch_counts", "run_level", "judge", "get_args_parser", "main"]

TOOL = "serving.loadtest"
PROTOCOLS = ("http", "grpc")


@dataclass
class LevelResult:
    """One protocol at one concurrency."""

    protocol: str
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # this process (the client threads) while the level ran
    server_cpu_s: float | None = None  # the server's process group while the level ran
    server_cpu_by_process: dict[str, float] = field(default_factory=dict)  # the same per command name
    direct: dict[str, Any] = field(default_factory=dict)  # the runner timed right before and after the level
    load_average: list[Any] = field(default_factory=list)  # before, after

    def summary(self) -> dict[str, Any]:
        lat = latency_stats(self.latencies_s) if self.latencies_s else {}
        per_img = (lambda cpu: cpu / self.ok if cpu is not None and self.ok else None)
        return {"protocol": self.protocol, "concurrency": self.concurrency, "sent": self.sent, "ok": self.ok,
                "errors": len(self.errors), "error_examples": sorted(set(self.errors))[:3],
                "throughput_img_s": self.ok / self.wall_s if self.wall_s else 0.0, "wall_s": self.wall_s,
                "latency_ms": {k: lat[k] for k in ("median", "p95", "p99", "max")} if lat else {},
                "batch_sizes": {str(k): v for k, v in sorted(self.batches.items())},
                "mean_batch": (sum(k * v for k, v in self.batches.items()) / max(1, sum(self.batches.values()))),
                "client_cpu_s": self.client_cpu_s, "client_cpu_s_per_img": per_img(self.client_cpu_s),
                "server_cpu_s": self.server_cpu_s, "server_cpu_s_per_img": per_img(self.server_cpu_s),
                "server_cpu_s_per_img_by_process": {k: per_img(v) for k, v in self.server_cpu_by_process.items()},
                "direct": self.direct, "load_average": self.load_average}


SPIN = {False: "no-spin", True: "spin"}  # ONNX Runtime's thread-pool spinning (t2t_vit.graphs.ort_session_options)


def direct_runners(artifact: Path, threads: int, served_spinning: bool) -> dict[str, Any]:
    """The runner the server serves (same file, threads and spinning) and the same with the other spinning
    setting, so a report shows what the server's setting costs the runner alone."""
    return {SPIN[s]: artifact_runner(artifact, threads=threads, spinning=s) for s in (served_spinning, not served_spinning)}


def _timed_infer(runner: Any, x: torch.Tensor, out: dict[str, list[float]]) -> None:
    c0 = time.process_time()  # the whole process: ONNX Runtime's pool threads included
    runner.infer(x)
    out["cpu"].append(time.process_time() - c0)


def time_direct(runners: dict[str, Any], batches: Sequence[int], size: int, seconds: float,
                rounds: int = 3) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Seconds and CPU seconds per call of each (active) runner at each batch size, interleaved
    (:func:`t2t_vit.timing.time_interleaved`: a drifting machine slows every case alike): ``seconds`` of
    calls per case over ``rounds`` rounds, at least one call per round. Warm-up calls are dropped."""
    samples: dict[str, dict[int, dict[str, list[float]]]] = {k: {b: {"s": [], "cpu": []} for b in batches} for k in runners}
    fns = {(label, b): functools.partial(_timed_infer, runner, torch.randn(b, 3, size, size), samples[label][b])
           for label, runner in runners.items() for b in batches}
    times = time_interleaved(fns, rounds=rounds, warmup=1, min_iters=rounds, min_time_s=seconds)
    for (label, b), ts in times.items():
        out = samples[label][b]
        out["cpu"] = out["cpu"][len(out["cpu"]) - len(ts):]  # the timed calls only, not the warm-up
        out["s"] = list(ts)
    return samples


def direct_summary(*parts: dict[str, dict[int, dict[str, list[float]]]]) -> dict[str, Any]:
    """Images/s per setting and batch size from the median call of the pooled ``parts`` (e.g. before and
    after a level), CPU seconds per image, and the best (setting, batch)."""
    img_s: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    for label in parts[0]:
        for b in sorted({b for p in parts for b in p.get(label, {})}):
            s = [t for p in parts for t in p.get(label, {}).get(b, {}).get("s", [])]
            c = [t for p in parts for t in p.get(label, {}).get(b, {}).get("cpu", [])]
            if s:
                img_s.setdefault(label, {})[str(b)] = b / float(np.median(s))
                cpu.setdefault(label, {})[str(b)] = float(np.median(c)) / b
    label, batch = max(((k, b) for k in img_s for b in img_s[k]), key=lambda kb: img_s[kb[0]][kb[1]])
    return {"img_s": img_s, "cpu_s_per_img": cpu, "best_setting": label, "best_batch": int(batch),
            "best_img_s": img_s[label][batch]}


def same_batches(summary: dict[str, Any], batches: dict[int, int]) -> dict[str, Any] | None:
    """The direct runner (its faster setting) on exactly the batches Triton executed: images/s = images /
    sum(count x median seconds per call at that size), and CPU seconds per image; None if a size was not timed."""
    best = None
    for label, rows in summary["img_s"].items():
        if not batches or any(str(b) not in rows for b in batches):
            continue
        images = sum(b * n for b, n in batches.items())
        v = images / sum(n * b / rows[str(b)] for b, n in batches.items())
        cpu = sum(n * b * summary["cpu_s_per_img"][label][str(b)] for b, n in batches.items()) / images
        if best is None or v > best["img_s"]:
            best = {"img_s": v, "cpu_s_per_img": cpu, "setting": label}
    return best


def _client_infer(protocol: str, url: str, model: str, x: np.ndarray, timeout_s: float) -> Callable[[], Any]:
    """A callable sending one request on its own connection (tritonclient clients are not shared between threads)."""
    if protocol == "http":
        import tritonclient.http as client

        c = client.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        inp = client.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return lambda: c.infer(model, [inp]).as_numpy("logits")
    import tritonclient.grpc as client

    c = client.InferenceServerClient(url)
    inp = client.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return lambda: c.infer(model, [inp], client_timeout=timeout_s).as_numpy("logits")


def drive(protocol: str, url: str, model: str, x: np.ndarray, concurrency: int, requests: int,
          max_seconds: float, timeout_s: float) -> LevelResult:
    """``concurrency`` threads send single-image requests until ``requests`` are sent or ``max_seconds`` pass.

    Every request ends as a response or an error (a refused connection, a server error, or the client
    timeout), recorded with its latency; threads are joined with a deadline."""
    res = LevelResult(protocol, concurrency)
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        try:
            call = _client_infer(protocol, url, model, x, timeout_s)
        except Exception as e:  # noqa: BLE001 - a client that cannot connect is an error result, not a crash
            with lock:
                res.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            return
        while True:
            with lock:
                if res.sent >= requests or time.monotonic() > deadline:
                    return
                res.sent += 1
            t0 = time.perf_counter()
            try:
                call()
                ok, err = True, ""
            except Exception as e:  # noqa: BLE001 - tritonclient raises several types; each is recorded
                ok, err = False, f"{type(e).__name__}: {str(e)[:200]}"
            dt = time.perf_counter() - t0
            with lock:
                res.latencies_s.append(dt)
                if ok:
                    res.ok += 1
                else:
                    res.errors.append(err)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + timeout_s + 5)
    res.wall_s = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    if hung:
        res.errors.extend([f"client thread still waiting after the {timeout_s:g} s timeout"] * hung)
    return res


def batch_counts(url: str, model: str) -> dict[int, int]:
    """Executions per batch size so far (Triton's statistics API: ``batch_stats[].compute_infer.count``)."""
    import tritonclient.http as client

    stats = client.InferenceServerClient(url).get_inference_statistics(model)
    rows = stats["model_stats"][0].get("batch_stats", [])
    return {int(r["batch_size"]): int(r["compute_infer"]["count"]) for r in rows}


# ----------------------------------------------------------------------------------------------------
# Plan -> execute -> report
# ----------------------------------------------------------------------------------------------------
def _cpu_now() -> float:
    """CPU seconds (user + system) of this process so far: every client thread's."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_level(server: ServerProcess, protocol: str, model: str, x: np.ndarray, c: int,
              args: argparse.Namespace) -> LevelResult:
    """One load level and the counters around it: batches formed, client and server CPU seconds."""
    url = server.http_url if protocol == "http" else server.grpc_url
    before, cpu0, srv0, load0 = batch_counts(server.http_url, model), _cpu_now(), server.cpu_by_process(), load_average()
    res = drive(protocol, url, model, x, c, args.requests, args.max_seconds, args.timeout)
    cpu1, srv1 = _cpu_now(), server.cpu_by_process()
    after = batch_counts(server.http_url, model)
    res.batches = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0) > 0}
    res.client_cpu_s = cpu1 - cpu0
    if srv0 is not None and srv1 is not None:  # processes that ended during the level are not counted
        res.server_cpu_by_process = {k: v - srv0.get(k, 0.0) for k, v in srv1.items()}
        res.server_cpu_s = sum(res.server_cpu_by_process.values())
    res.load_average = [load0, load_average()]
    return res


def preferred_sizes(spec: str, sweep: dict[str, Any], max_batch: int) -> list[int]:
    """The preferred batch sizes the served model gets (see ``--preferred-batch-size``).

    ``auto`` stops at the batch the direct runner served fastest in ``sweep``: larger batches are not faster
    on that runner, and with one model instance a batch that takes every queued request leaves nothing to run
    while its responses travel back and the clients send the next ones.
    """
    if spec == "all":
        return [b for b in (2 ** i for i in range(1, 12)) if b <= max_batch] or [max_batch]
    if spec == "auto":
        best = max(2, min(int(sweep["best_batch"]), max_batch))
        return [b for b in (2 ** i for i in range(1, 12)) if b <= best]
    try:
        sizes = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or sizes[-1] > max_batch:
        raise T2TError(f"--preferred-batch-size {spec!r}: give auto, all, or a comma list of sizes from 1 to "
                            f"--max-batch-size {max_batch}")
    return sizes


def _levels(server: ServerProcess, model: str, x: np.ndarray, args: argparse.Namespace,
            runners: dict[str, Any], batches: Sequence[int]) -> list[LevelResult]:
    """Every level, with the direct runner timed right before it and right after it (its batch sizes up to
    the maximum, and after it also every size Triton formed), on the same cores at the same time."""
    results = []
    size = x.shape[-1]
    for protocol in args.protocols:
        for c in args.concurrency:
            pre = time_direct(runners, batches, size, args.level_direct_seconds)
            res = run_level(server, protocol, model, x, c, args)
            post = time_direct(runners, sorted(set(batches) | set(res.batches)), size, args.level_direct_seconds)
            d = direct_summary(pre, post)
            res.direct = {**d, "same_batches": same_batches(d, res.batches)}
            print(f"{protocol} c={c}: {res.ok}/{res.sent} ok, {res.ok / res.wall_s:.1f} img/s "
                  f"(direct around it: {d['best_img_s']:.1f} at batch {d['best_batch']}, {d['best_setting']}), "
                  f"batches {res.batches}, client CPU {res.client_cpu_s:.1f} s", flush=True)
            results.append(res)
    return results


def judge(levels: list[dict[str, Any]], goal: float) -> list[str]:
    """Why the goal is missed (empty: met): every request answered, and at the top concurrency throughput
    >= goal x the direct runner at its best batch size and setting, timed right before and after that level."""
    top = max(r["concurrency"] for r in levels)
    why = []
    for r in levels:
        if r["errors"] or r["ok"] != r["sent"]:
            why.append(f"{r['protocol']} c={r['concurrency']}: {r['errors']} of {r['sent']} requests failed")
        d = r["direct"]
        if r["concurrency"] == top and r["throughput_img_s"] < goal * d["best_img_s"]:
            why.append(f"{r['protocol']} c={top}: {r['throughput_img_s']:.1f} img/s < {goal:g} x the direct runner's "
                       f"{d['best_img_s']:.1f} img/s (batch {d['best_batch']}, {d['best_setting']}, timed around the level)")
    return why


def _f(v: float | None, fmt: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def _tables(r: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The throughput rows and the CPU rows of the levels."""
    sweep = r["direct"]["best_img_s"]
    rows, cpu = [], []
    for x in r["levels"]:
        d, img_s = x["direct"], x["throughput_img_s"]
        same = d.get("same_batches") or {}
        rows.append([x["protocol"], x["concurrency"], f"{x['ok']}/{x['sent']}", f"{img_s:.1f}",
                     f"{d['best_img_s']:.1f} (b{d['best_batch']}, {d['best_setting']})", f"**{img_s / d['best_img_s']:.2f}x**",
                     f"{img_s / same['img_s']:.2f}x" if same else "-", f"{img_s / sweep:.2f}x",
                     *(f"{x['latency_ms'].get(k, float('nan')):.1f}" for k in ("median", "p95", "p99")),
                     f"{x['mean_batch']:.1f}", ", ".join(f"{b}:{n}" for b, n in x["batch_sizes"].items())])
        total = x["client_cpu_s"] + (x["server_cpu_s"] or 0.0)
        (l0, l1) = [(la or [None])[0] for la in x["load_average"]] if x["load_average"] else (None, None)
        by = ", ".join(f"{k} {_f(v, '.1f', 1e3)}" for k, v in sorted(x.get("server_cpu_s_per_img_by_process", {}).items(),
                                                                      key=lambda kv: -(kv[1] or 0)))
        cpu.append([x["protocol"], x["concurrency"], _f(x["client_cpu_s_per_img"], ".1f", 1e3),
                    _f(x["server_cpu_s_per_img"], ".1f", 1e3), by or "-",
                    _f(total / x["ok"] if x["ok"] and x["server_cpu_s"] is not None else None, ".1f", 1e3),
                    _f(same.get("cpu_s_per_img"), ".1f", 1e3), _f(total / x["wall_s"] if x["wall_s"] else None, ".2f"),
                    f"{_f(l0, '.2f')} / {_f(l1, '.2f')}"])
    return rows, cpu


def render_markdown(r: dict[str, Any]) -> str:
    d = r["direct"]
    rows, cpu = _tables(r)
    labels = list(d["before"]["img_s"])
    direct_rows = [[b, *(_f(d[when]["img_s"][k].get(b)) for k in labels for when in ("before", "after"))]
                   for b in d["before"]["img_s"][labels[0]]]
    verdict = "met" if not r["goal_missed"] else "MISSED: " + "; ".join(r["goal_missed"])
    return "\n".join([
        f"# Triton serving load test: {r['model']} ({r['runner']})", "",
        f"Command: `{r['command']}`  ", f"Host: {host_line(r['host'])}  ",
        f"Load average before / after: {r['load_average_before']} / {r['load_average_after']}  ",
        f"Served: `{r['artifact']}` at {r['img_size']} px, weights: {r['weights']}; max_batch_size {r['max_batch_size']} (preferred batch sizes {r.get('preferred_batch_size', 'all')}), "
        f"{r['threads']} runner thread(s), ONNX Runtime spinning {r['served_setting']}, dynamic batching; "
        f"single-image requests, at most {r['requests']} per level or {r['max_seconds']:g} s, client timeout "
        f"{r['timeout_s']:g} s.", "",
        f"Goal: at concurrency {max(r['concurrency'])}, >= {r['goal']:g}x the direct runner at its best batch size and "
        f"spinning setting, timed right before and right after that level (median call of the repeats), every "
        f"request answered: **{verdict}**.", "",
        markdown_table(["protocol", "concurrency", "answered", "img/s", "direct around the level (img/s)",
                        "vs direct around (goal)", "vs direct on the same batches", "vs direct sweep best",
                        "p50 ms", "p95 ms", "p99 ms", "mean batch", "batches formed (size:count)"], rows), "",
        "`vs direct around`: against the direct runner timed just before and just after the level, at every batch "
        "size up to max_batch_size with both spinning settings (median call of the repeats; the best size and "
        "setting). `vs direct on the same batches`: against the time the direct runner takes for exactly the "
        "batches Triton formed. `vs direct sweep best`: the earlier method, against the fastest of every timing "
        f"before the server started and after it stopped ({d['best_img_s']:.1f} img/s at batch {d['best_batch']}, "
        f"{d['best_setting']}, {d['best_when']}).", "",
        "Where the CPU goes (ms of CPU time per answered image; the machine has "
        f"{r['host'].get('cpu_cores_usable')} cores):", "",
        markdown_table(["protocol", "concurrency", "client CPU ms/img", "server CPU ms/img", "server by process",
                        "client + server CPU ms/img", "direct runner CPU ms/img, same batches",
                        "cores busy (client + server)", "load average 1-min before / after"], cpu), "",
        "Client: this process's user + system time while the level ran (its threads only send and wait). Server: "
        "the server's process group from /proc, by command name: `python` is the process running the runner "
        "(PyTriton's model side and ONNX Runtime), `tritonserver` Triton's HTTP/gRPC front end and dynamic "
        "batcher, `triton_python_b` the Python-backend stubs that hand each batch to it.", "",
        f"The direct runner ({d['runner']}, same file and threads, in this process) before the server started and "
        "after it stopped, img/s, both spinning settings timed interleaved:", "",
        markdown_table(["batch", *(f"{k} {when}" for k in labels for when in ("before", "after"))], direct_rows), "",
        "Batches formed: Triton's statistics API (`batch_stats`, executions per batch size) read before and after "
        "each level. Method and caveats: [docs/serving.md](../docs/serving.md).", ""])


def plot(r: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for proto in PROTOCOLS:
        rows = [x for x in r["levels"] if x["protocol"] == proto]
        if rows:
            a.plot([x["concurrency"] for x in rows], [x["throughput_img_s"] for x in rows], "o-", label=f"Triton {proto}")
            b.plot([x["concurrency"] for x in rows], [x["latency_ms"].get("p99", float("nan")) for x in rows], "o-",
                   label=f"{proto} p99")
            b.plot([x["concurrency"] for x in rows], [x["latency_ms"].get("median", float("nan")) for x in rows], "s--",
                   label=f"{proto} p50")
            a.plot([x["concurrency"] for x in rows], [x["direct"]["best_img_s"] for x in rows], "x:",
                   label=f"direct around the {proto} levels")
            a.plot([x["concurrency"] for x in rows], [r["goal"] * x["direct"]["best_img_s"] for x in rows], "r--",
                   lw=0.6, label=f"goal {r['goal']:g}x ({proto})")
    d = r["direct"]
    a.axhline(d["best_img_s"], color="k", ls=":", label=f"direct sweep best, batch {d['best_batch']}")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title=f"{r['model']} throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency ms", title="latency")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    artifacts = Path(args.artifacts) if args.artifacts else default_out(args.model)
    artifact = Path(args.artifact) if args.artifact else onnx_path(artifacts, args.model, "fp32")
    if not artifact.is_file():
        raise T2TError(f"{artifact} not found: export it first with `make onnx MODEL={args.model}` (or ARTIFACT=)")
    bad = [p for p in args.protocols if p not in PROTOCOLS]
    if bad:
        raise T2TError(f"--protocols {bad}: use http and/or grpc")
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1:
        raise T2TError("--concurrency needs positive numbers and --requests at least 1")
    if args.direct_seconds < 0 or args.level_direct_seconds < 0:
        raise T2TError("--direct-seconds and --level-direct-seconds need 0 or more seconds (0: 3 calls per case)")
    if args.preferred_batch_size not in ("auto", "all"):
        preferred_sizes(args.preferred_batch_size, {}, args.max_batch_size)  # a bad list: one line, nothing run
    threads = resolve_threads(args.threads)
    header = report_header(TOOL, argv)
    load_before = load_average()
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch_size]
    meta = OnnxRuntimeRunner(artifact).metadata
    size = int(meta.get("img_size", 224))
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    runners = direct_runners(artifact, threads, args.ort_spinning)
    with contextlib.ExitStack() as stack:
        for runner in runners.values():
            stack.enter_context(runner)
        sweep_before = direct_summary(time_direct(runners, batches, size, args.direct_seconds))
        print(f"direct: best {sweep_before['best_img_s']:.1f} img/s at batch {sweep_before['best_batch']} "
              f"({sweep_before['best_setting']})", flush=True)
        spin = "--ort-spinning" if args.ort_spinning else "--no-ort-spinning"
        preferred = preferred_sizes(args.preferred_batch_size, sweep_before, args.max_batch_size)
        print(f"dynamic batching: preferred batch sizes {preferred}", flush=True)
        with ServerProcess(artifact, threads=threads, max_batch_size=args.max_batch_size,
                           extra=["--max-queue-delay-us", str(args.max_queue_delay_us), spin,
                                  "--preferred-batch-size", ",".join(map(str, preferred))]) as server:
            model = meta.get("model") or args.model
            levels = [lv.summary() for lv in _levels(server, model, x, args, runners, batches)]
        # Timed again once the server is gone: a machine whose load changed during the run shows it here.
        sweep_after = direct_summary(time_direct(runners, batches, size, args.direct_seconds))
    first = sweep_before["best_img_s"] >= sweep_after["best_img_s"]
    best = sweep_before if first else sweep_after
    direct = {"runner": next(iter(runners.values())).name, "threads": threads, "before": sweep_before,
              "after": sweep_after, "best_img_s": best["best_img_s"], "best_batch": best["best_batch"],
              "best_setting": best["best_setting"], "best_when": "before the server started" if first else
              "after the server stopped"}
    report = {**header, "model": args.model, "artifact": str(artifact), "runner": direct["runner"],
              "img_size": size, "weights": "checkpoint" if meta.get("checkpoint_sha256", "").strip()[:4] not in
              ("", "none") else "random, trained-like (what make onnx writes without a checkpoint)",
              "threads": threads, "served_setting": SPIN[args.ort_spinning], "max_batch_size": args.max_batch_size,
            "preferred_batch_size": preferred,
              "requests": args.requests, "max_seconds": args.max_seconds, "timeout_s": args.timeout,
              "concurrency": list(args.concurrency), "goal": args.goal, "direct": direct, "levels": levels,
              "load_average_before": load_before, "load_average_after": load_average()}
    report["goal_missed"] = judge(levels, args.goal)
    paths = write_report(Path(args.out) / f"serve-{args.model}", report, render_markdown(report), plot(report))
    print("wrote " + ", ".join(map(str, paths)))
    if report["goal_missed"]:
        raise ThresholdMissed("; ".join(report["goal_missed"]))
    return 0


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(TOOL, add_help=add_help, description="Triton load test vs the direct runner")
    p.add_argument("--model", required=True, help="registered model name (its artifacts in --artifacts)")
    p.add_argument("--artifacts", default=None, help="artifact folder (default artifacts/<model>)")
    p.add_argument("--artifact", default=None, help="the ONNX graph to serve (default <artifacts>/<model>.fp32.onnx)")
    p.add_argument("--out", default="reports", help="report folder (default reports)")
    p.add_argument("--protocols", type=comma_list(), default=list(PROTOCOLS), help="http,grpc (default both)")
    p.add_argument("--concurrency", type=comma_list(int), default=[1, 4, 16], help="client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=400, help="requests per level at most (default 400)")
    p.add_argument("--max-seconds", type=float, default=45.0, help="seconds per level at most (default 45)")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds (default 30)")
    p.add_argument("--max-batch-size", type=int, default=32, help="the server's max_batch_size (default 32)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay (default 2000)")
    p.add_argument("--preferred-batch-size", default="auto",
                   help="the server's preferred batch sizes: auto (default: powers of two up to the direct runner's "
                        "best batch, measured before the server starts), all (every power of two up to "
                        "--max-batch-size, make serve's default) or a comma list")
    p.add_argument("--direct-seconds", type=float, default=3.0,
                   help="direct runner timing per batch size and setting, before and after the server (default 3)")
    p.add_argument("--level-direct-seconds", type=float, default=0.5,
                   help="direct runner timing per batch size and setting right before and after each level (default "
                        "0.5; at least 3 calls each)")
    p.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, default=False,
                   help="the served runner's ONNX Runtime spinning (default off; the direct runner is timed both ways)")
    p.add_argument("--goal", type=float, default=0.9, help="throughput goal vs the direct runner (default 0.9)")
    p.add_argument("--threads", default="auto", help="runner threads, server and direct alike (number or auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_command(lambda: run(args, argv), TOOL)


if __name__ == "__main__":
    sys.exit(main())
