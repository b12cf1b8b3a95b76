"""Load test of the Triton server against the same runner called directly (``make loadtest``).

::

    make loadtest MODEL=t2t_vit_7            # serves artifacts/t2t_vit_7/t2t_vit_7.fp32.onnx
    python -m serving.loadtest --model t2t_vit_7 --concurrency 1,4,16 --requests 400 --max-seconds 60

Plan -> execute -> report:

1. the direct runner (:class:`~t2t_vit.runners.OnnxRuntimeRunner` on the served file, same thread count)
   timed at each batch size up to the server's maximum, before the server starts (nothing else runs);
2. a server (:class:`serving.process.ServerProcess`, Triton on free 127.0.0.1 ports) driven by
   ``tritonclient`` over HTTP and gRPC at each concurrency: that many client threads, one single-image
   request at a time each, until ``--requests`` are answered or ``--max-seconds`` pass, each request with a
   client timeout; Triton's statistics API before and after each level gives the batch sizes its dynamic
   batcher formed;
3. ``<out>/serve-<model>.{json,md,png}``: throughput, latency p50/p95/p99, errors and batch sizes per
   protocol and concurrency, against the direct runner's best batch size.

Goal: at the highest concurrency, throughput >= ``--goal`` (0.9) x the direct runner at its best batch
size, and every request answered; exit 1 when missed (the report is written first).
"""
from __future__ import annotations

import argparse
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
from t2t_vit.timing import latency_stats, load_average, time_calls

__all__ = ["LevelResult", "direct_baseline", "drive", "batch_counts", "get_args_parser", "main"]

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

    def summary(self) -> dict[str, Any]:
        lat = latency_stats(self.latencies_s) if self.latencies_s else {}
        return {"protocol": self.protocol, "concurrency": self.concurrency, "sent": self.sent, "ok": self.ok,
                "errors": len(self.errors), "error_examples": sorted(set(self.errors))[:3],
                "throughput_img_s": self.ok / self.wall_s if self.wall_s else 0.0, "wall_s": self.wall_s,
                "latency_ms": {k: lat[k] for k in ("median", "p95", "p99", "max")} if lat else {},
                "batch_sizes": {str(k): v for k, v in sorted(self.batches.items())},
                "mean_batch": (sum(k * v for k, v in self.batches.items()) / max(1, sum(self.batches.values())))}


def direct_baseline(artifact: Path, threads: int, batches: Sequence[int], min_time_s: float) -> dict[str, Any]:
    """Images/s of the runner itself at each batch size (the numbers the server is judged against)."""
    runner = artifact_runner(artifact, threads=threads)
    size = runner.data_config.img_size
    rows = {}
    with runner:
        for b in batches:
            x = torch.randn(b, 3, size, size)
            times = time_calls(lambda: runner.infer(x), warmup=2, min_iters=3, min_time_s=min_time_s)
            rows[b] = b / float(np.median(times))
    best = max(rows, key=rows.get)
    return {"runner": runner.name, "threads": threads, "img_s": {str(b): v for b, v in rows.items()},
            "best_batch": best, "best_img_s": rows[best]}


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
def _levels(server: ServerProcess, model: str, x: np.ndarray, args: argparse.Namespace) -> list[LevelResult]:
    results = []
    for protocol in args.protocols:
        url = server.http_url if protocol == "http" else server.grpc_url
        for c in args.concurrency:
            before = batch_counts(server.http_url, model)
            res = drive(protocol, url, model, x, c, args.requests, args.max_seconds, args.timeout)
            after = batch_counts(server.http_url, model)
            res.batches = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0) > 0}
            print(f"{protocol} c={c}: {res.ok}/{res.sent} ok, {res.ok / res.wall_s:.1f} img/s, "
                  f"batches {res.batches}", flush=True)
            results.append(res)
    return results


def judge(levels: list[dict[str, Any]], direct: dict[str, Any], goal: float) -> list[str]:
    """Why the goal is missed (empty: met): top concurrency >= goal x direct best, every request answered."""
    top = max(r["concurrency"] for r in levels)
    why = []
    for r in levels:
        if r["errors"] or r["ok"] != r["sent"]:
            why.append(f"{r['protocol']} c={r['concurrency']}: {r['errors']} of {r['sent']} requests failed")
        if r["concurrency"] == top and r["throughput_img_s"] < goal * direct["best_img_s"]:
            why.append(f"{r['protocol']} c={top}: {r['throughput_img_s']:.1f} img/s < {goal:g} x the direct runner's "
                       f"{direct['best_img_s']:.1f} img/s (batch {direct['best_batch']})")
    return why


def render_markdown(r: dict[str, Any]) -> str:
    d = r["direct"]
    rows = [[x["protocol"], x["concurrency"], f"{x['ok']}/{x['sent']}", f"{x['throughput_img_s']:.1f}",
             f"{x['throughput_img_s'] / d['best_img_s']:.2f}x",
             *(f"{x['latency_ms'].get(k, float('nan')):.1f}" for k in ("median", "p95", "p99")),
             f"{x['mean_batch']:.1f}", ", ".join(f"{b}:{n}" for b, n in x["batch_sizes"].items())]
            for x in r["levels"]]
    direct_rows = [[b, f"{d['before'][b]:.1f}", f"{d['after'][b]:.1f}"] for b in d["before"]]
    verdict = "met" if not r["goal_missed"] else "MISSED: " + "; ".join(r["goal_missed"])
    return "\n".join([
        f"# Triton serving load test: {r['model']} ({r['runner']})", "",
        f"Command: `{r['command']}`  ", f"Host: {host_line(r['host'])}  ",
        f"Load average before / after: {r['load_average_before']} / {r['load_average_after']}  ",
        f"Served: `{r['artifact']}` at {r['img_size']} px, weights: {r['weights']}; max_batch_size {r['max_batch_size']}, "
        f"{r['threads']} runner thread(s), dynamic batching; single-image requests, at most {r['requests']} per level "
        f"or {r['max_seconds']:g} s, client timeout {r['timeout_s']:g} s.", "",
        f"Goal: at concurrency {max(r['concurrency'])}, >= {r['goal']:g}x the direct runner at its best batch size "
        f"({d['best_img_s']:.1f} img/s at batch {d['best_batch']}), every request answered: **{verdict}**.", "",
        markdown_table(["protocol", "concurrency", "answered", "img/s", "vs direct", "p50 ms", "p95 ms", "p99 ms",
                        "mean batch", "batches formed (size:count)"], rows), "",
        f"The direct runner ({d['runner']}, same file and threads, in this process, timed before the server "
        f"started and after it stopped; the goal uses the faster):", "",
        markdown_table(["batch", "img/s before", "img/s after"], direct_rows), "",
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
    d = r["direct"]
    a.axhline(d["best_img_s"], color="k", ls=":", label=f"direct, batch {d['best_batch']}")
    a.axhline(r["goal"] * d["best_img_s"], color="r", ls="--", lw=0.8, label=f"goal {r['goal']:g}x")
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
    threads = resolve_threads(args.threads)
    header = report_header(TOOL, argv)
    load_before = load_average()
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch_size]
    direct = direct_baseline(artifact, threads, batches, args.direct_seconds)
    print(f"direct {direct['runner']}: best {direct['best_img_s']:.1f} img/s at batch {direct['best_batch']}", flush=True)
    meta = OnnxRuntimeRunner(artifact).metadata
    size = int(meta.get("img_size", 224))
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with ServerProcess(artifact, threads=threads, max_batch_size=args.max_batch_size,
                       extra=["--max-queue-delay-us", str(args.max_queue_delay_us)]) as server:
        model = meta.get("model") or args.model
        levels = [lv.summary() for lv in _levels(server, model, x, args)]
    # Timed again once the server is gone: a machine whose load changed during the run shows it here, and the
    # goal is judged against the faster of the two (the stricter comparison).
    after = direct_baseline(artifact, threads, batches, args.direct_seconds)
    direct = {**(direct if direct["best_img_s"] >= after["best_img_s"] else after),
              "before": direct["img_s"], "after": after["img_s"]}
    report = {**header, "model": args.model, "artifact": str(artifact), "runner": direct["runner"],
              "img_size": size, "weights": "checkpoint" if meta.get("checkpoint_sha256", "").strip()[:4] not in
              ("", "none") else "random, trained-like (what make onnx writes without a checkpoint)",
              "threads": threads, "max_batch_size": args.max_batch_size, "requests": args.requests,
              "max_seconds": args.max_seconds, "timeout_s": args.timeout, "concurrency": list(args.concurrency),
              "goal": args.goal, "direct": direct, "levels": levels, "load_average_before": load_before,
              "load_average_after": load_average()}
    report["goal_missed"] = judge(levels, direct, args.goal)
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
    p.add_argument("--direct-seconds", type=float, default=3.0, help="timing per direct batch size (default 3)")
    p.add_argument("--goal", type=float, default=0.9, help="throughput goal vs the direct runner (default 0.9)")
    p.add_argument("--threads", default="auto", help="runner threads, server and direct alike (number or auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_command(lambda: run(args, argv), TOOL)


if __name__ == "__main__":
    sys.exit(main())
