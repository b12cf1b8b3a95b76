"""The quick start on a busy machine (``make bench-busy``): the demo's training step, idle and with a
competing job, with each thread setting, side by side in one run.

On a machine whose cores are all in use, OpenMP threads that outnumber the free cores spin-wait for each
other at every parallel region and throughput falls off a cliff (reports/bench-busy.md has the measured
slowdowns). The default ``--threads auto`` counts the cores idle
when a step starts. This benchmark runs ``python -m evaluation.demo --steps data,train`` (the quick start's
longest step, shortened with ``--train-images``) under each condition:

* ``load``: ``idle``, or ``busy`` = ``--load`` competing processes spinning on the CPU (default 1: one
  core of a 2-core machine taken by someone else's job);
* ``threads``: ``auto`` (the default), or a fixed number (``all`` = every usable core, what PyTorch
  picks by itself), optionally with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning).

It records the demo's train-step wall time, the training img/s, and the threads the step chose, and writes
``<out>/bench-busy.{json,md,png}`` with the slowdown of each row against idle ``auto``. Run it on an
otherwise idle machine: it makes its own load.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from t2t_vit.cli import comma_list, run_command
from t2t_vit.errors import T2TError
from t2t_vit.reports import host_line, markdown_table, pyplot, report_header, write_report
from t2t_vit.timing import child_process_kwargs, load_average, run_child

__all__ = ["parse_condition", "get_args_parser", "main"]

DEFAULT_CONDITIONS = ["idle:auto", "idle:all", "busy:auto", "busy:all", "busy:all:passive", "busy:1"]


def parse_condition(spec: str, cores: int) -> dict[str, Any]:
    """``load:threads[:passive]`` -> a condition (``threads``: ``auto``, ``all`` or a number)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("idle", "busy") or (len(parts) == 3 and parts[2] != "passive"):
        raise T2TError(f"--conditions: {spec!r} is not load:threads[:passive] (load idle|busy, threads auto|all|N)")
    threads = parts[1]
    if threads == "all":
        threads = str(cores)
    elif threads != "auto" and not (threads.isdigit() and int(threads) > 0):
        raise T2TError(f"--conditions: threads in {spec!r} must be auto, all or a positive number")
    return {"name": spec, "load": parts[0], "threads": threads, "omp_passive": len(parts) == 3}


def _spinner() -> subprocess.Popen:
    """One competing job: a process that keeps one core busy (stopped with this process, too)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], **child_process_kwargs())


def run_condition(cond: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import os

    out = work / cond["name"].replace(":", "-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # the row says what it runs with, not the shell
        env.pop(var, None)
    if cond["omp_passive"]:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, "-m", "evaluation.demo", "--steps", "data,train", "--out", str(out),
           "--epochs", str(args.epochs), "--train-images", str(args.train_images), "--val-images",
           str(args.val_images), "--dataset", args.dataset]
    if cond["threads"] != "auto":
        cmd += ["--threads", cond["threads"]]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench-busy.log"
    spinners = [_spinner() for _ in range(args.load if cond["load"] == "busy" else 0)]
    try:
        if spinners:
            time.sleep(args.settle)  # the competing job is running before the demo starts, as it would be
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = run_child(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
        wall = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        raise T2TError(f"the demo under {cond['name']} ran past --timeout {args.timeout:g} s (stopped); its output: "
                       f"{log}") from None
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if proc.returncode != 0:
        raise T2TError(f"the demo failed under {cond['name']} (exit {proc.returncode}); its output: {log} "
                       f"(--work keeps it)")
    demo = json.loads((out / "demo.json").read_text())
    train = next(s for s in demo["steps"] if s["step"] == "train")
    with open(out / "train" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    config = yaml.safe_load((out / "train" / "config.yaml").read_text())
    return {**cond, "dataset": demo["dataset"], "train_step_s": train["seconds"], "demo_s": wall,
            "img_per_s": sum(float(r["img_per_s"]) for r in rows) / len(rows),
            "threads_used": config.get("threads_resolved"), "epochs": len(rows)}


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# The quick start on a busy machine: threads against a competing job", "",
             f"`{report['command']}`", "",
             f"Host: {host_line(report['host'])}; {report['cores']} usable cores; load average before "
             f"{report['load_average_start']}, after {report['load_average_end']}. Each row runs "
             f"`python -m evaluation.demo --steps data,train` ({report['dataset']}, {report['train_images']} "
             f"training images, {report['epochs']} epoch(s)); `busy` = {report['load']} other process(es) spinning "
             f"on the CPU from before the demo starts. Slowdown: train-step time over `{report['baseline']}`'s.", ""]
    rows = [[r["name"], r["load"], r["threads"], "PASSIVE" if r["omp_passive"] else "default", r["threads_used"],
             r["img_per_s"], r["train_step_s"], f"{r['slowdown']:.2f}x"] for r in report["rows"]]
    lines += [markdown_table(["condition", "load", "--threads", "OMP_WAIT_POLICY", "threads used", "train img/s",
                              "train step s", "slowdown"], rows), ""]
    if report.get("verdict"):
        lines += [report["verdict"], ""]
    lines += ["![train img/s by condition](bench-busy.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(list(y), [r["img_per_s"] for r in rows],
            color=["#4c72b0" if r["threads"] == "auto" else "#8c8c8c" for r in rows])
    ax.set_yticks(list(y), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("demo training, images/s")
    ax.set_title("auto threads (blue) vs fixed, idle and busy")
    fig.tight_layout()
    return fig


def _verdict(rows: list[dict[str, Any]], load: int) -> str:
    by = {r["name"]: r for r in rows}
    if "busy:auto" in by and "idle:auto" in by:
        worst_fixed = max((r for r in rows if r["load"] == "busy" and r["threads"] != "auto"),
                          key=lambda r: r["slowdown"], default=None)
        jobs = "one competing job" if load == 1 else f"{load} competing jobs"
        text = (f"With {jobs} the default (`auto`) trains at {by['busy:auto']['img_per_s']:.0f} img/s, "
                f"{by['busy:auto']['slowdown']:.2f}x the idle time (idle: {by['idle:auto']['img_per_s']:.0f} img/s)")
        if worst_fixed:
            text += (f"; `{worst_fixed['name']}` is {worst_fixed['slowdown']:.2f}x "
                     f"({worst_fixed['img_per_s']:.0f} img/s)")
        return text + "."
    return ""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="the demo's training step idle and under a competing load, per "
                                            "thread setting", add_help=add_help)
    p.add_argument("--conditions", type=comma_list(str), default=DEFAULT_CONDITIONS,
                   help=f"load:threads[:passive], comma-separated (default {','.join(DEFAULT_CONDITIONS)})")
    p.add_argument("--load", type=int, default=1, help="competing spinning processes when busy (default 1)")
    p.add_argument("--dataset", choices=("auto", "imagenette", "digits"), default="auto")
    p.add_argument("--train-images", type=int, default=960, help="demo training images (default 960)")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--settle", type=float, default=2.0, help="seconds the load runs before the demo (default 2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per condition before giving up")
    p.add_argument("--work", default=None, help="folder for the demo runs (default a temporary one)")
    p.add_argument("--out", default="reports")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if not args.conditions:
            raise T2TError("--conditions is empty; e.g. --conditions idle:auto,busy:auto")
        if args.load < 1:
            raise T2TError(f"--load must be at least 1 competing process, got {args.load}")
        conds = [parse_condition(c, cores) for c in args.conditions]
        header = report_header("studies.bench_busy", argv)
        start_load = load_average()
        with tempfile.TemporaryDirectory(prefix="t2t-busy-") as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            rows = []
            for i, c in enumerate(conds, 1):
                print(f"[{i}/{len(conds)}] {c['name']} ...", flush=True)
                rows.append(run_condition(c, args, work))
                print(f"[{i}/{len(conds)}] {c['name']}: {rows[-1]['img_per_s']:.0f} img/s, "
                      f"train step {rows[-1]['train_step_s']:.1f} s", flush=True)
        base = next((r for r in rows if r["name"] == "idle:auto"), rows[0])
        for r in rows:
            r["slowdown"] = r["train_step_s"] / base["train_step_s"]
        report = {**header, "cores": cores, "load": args.load, "dataset": rows[0]["dataset"], "baseline": base["name"],
                  "train_images": args.train_images, "epochs": args.epochs, "rows": rows,
                  "load_average_start": start_load, "load_average_end": load_average()}
        report["verdict"] = _verdict(rows, args.load)
        md = render_markdown(report)
        write_report(Path(args.out) / "bench-busy", report, md, plot(report))
        print(md)
        return 0

    return run_command(body, "studies.bench_busy")


if __name__ == "__main__":
    sys.exit(main())
