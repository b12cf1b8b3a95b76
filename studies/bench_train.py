"""Training throughput (img/s) and peak memory per model, SDPA vs explicit attention, in one run.

    python -m studies train                          # CPU: t2t_vit_7 and t2t_vit_t_14 at 112 px
    python -m studies train --img-size 224 --batch-size 64 --compile   # on a GPU: bf16 autocast

One training step = forward + loss + backward + AdamW step (timm optimizer factory, the recipe's
no-weight-decay rules), on random inputs of the model's shape, so data loading is excluded. Each
(model, attention) case runs in a fresh subprocess so its peak memory is its own: on CPU the
process's peak RSS, on a GPU ``torch.cuda.max_memory_allocated``. Writes
``<out>/bench-train-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

import t2t_vit  # registers the models with timm
from t2t_vit.cli import comma_list, run_command
from t2t_vit.errors import T2TError
from t2t_vit.reports import host_line, markdown_table, report_header, write_report
from t2t_vit.timing import PeakMemory, load_average, run_case_in_subprocess

from train.train import resolve_precision


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training throughput and peak memory, SDPA vs explicit attention",
                                add_help=add_help)
    p.add_argument("--models", type=comma_list(str), default=["t2t_vit_7", "t2t_vit_t_14"],
                   help="models, comma-separated (default t2t_vit_7,t2t_vit_t_14)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: 112 on CPU, where 224 takes minutes per case on 2 cores; 224 on GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 30 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--attn", type=comma_list(str), default=["sdpa", "explicit"],
                   help="attention paths, comma-separated: sdpa, explicit (default both)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (faster start; peak memory is then cumulative)")
    p.add_argument("--out", default="reports")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case (JSON) ...
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)  # ... and write its result here
    return p


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Time ``steps`` training steps of one model/attention configuration in this process."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    amp_dtype, use_scaler = resolve_precision(case["precision"], device)
    torch.manual_seed(0)
    model = timm.create_model(case["model"], num_classes=1000, img_size=case["img_size"], drop_path_rate=0.1)
    model.set_fused_attn(case["attn"] == "sdpa")
    model.to(device).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    step_model = torch.compile(model) if case["compile"] else model
    b, s = case["batch_size"], case["img_size"]
    x = torch.randn(b, 3, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    crit = torch.nn.CrossEntropyLoss()

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = crit(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.item()  # .item() synchronises the GPU, so the wall clock is honest

    return {**case, **time_steps(step, device, b, case["warmup"], case["steps"]),
            "precision_resolved": str(amp_dtype or "fp32")}


def time_steps(step: Callable[[], float], device: torch.device, batch_size: int, warmup: int,
               steps: int) -> dict[str, Any]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step`` (one training step returning its loss
    as a float, which synchronises the device); img/s and step times from the median, peak memory."""
    for _ in range(warmup):
        step()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"img_per_s": round(batch_size / median, 2), "step_ms_median": round(1000 * median, 1),
            "step_ms_min": round(1000 * times[0], 1), "peak_mem_mib": round(mem.peak_mib, 1),
            "peak_mem_kind": mem.kind, "final_loss": round(loss, 4)}


def render_markdown(report: dict[str, Any], tag: str) -> list[str]:
    """The Markdown table of a benchmark report (one row per model x attention path)."""
    lines = [f"# Training throughput ({tag})", "", f"`{report['command']}`", "",
             f"Host: {host_line(report['host'])}; {report['torch_threads']} torch threads; load average at the end "
             f"{report['load_average_end']}.", "", report["what"] + ".", ""]
    if "note" in report:
        lines += [report["note"], ""]
    rows = [[r["model"], r["attn"], r["img_size"], r["batch_size"]]
            + (["-", f"error: {r['error']}", "", ""] if "error" in r else
               [r["precision_resolved"], str(r["img_per_s"]), str(r["step_ms_median"]),
                f"{r['peak_mem_mib']} ({r['peak_mem_kind']})"])
            for r in report["results"]]
    lines += markdown_table(["model", "attention", "img", "batch", "precision", "img/s", "step ms (median)",
                             "peak mem MiB"], rows).split("\n")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.case:
        import json

        Path(args.case_out).write_text(json.dumps(run_case(json.loads(args.case))))
        return 0

    def body() -> int:
        bad = [a for a in args.attn if a not in ("sdpa", "explicit")]
        if bad:
            raise T2TError(f"--attn takes sdpa and/or explicit, got {bad}")
        unknown = [m for m in args.models if m not in t2t_vit.ARCHS]
        if unknown:
            raise T2TError(f"unknown models {unknown}; registered: {', '.join(t2t_vit.ARCHS)}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = device.startswith("cuda")
        img = args.img_size or (224 if gpu else 112)
        bs = args.batch_size or (64 if gpu else 16)
        steps = args.steps or (30 if gpu else 5)
        cases = [dict(model=m, attn=a, device=device, img_size=img, batch_size=bs, steps=steps, warmup=args.warmup,
                      precision=args.precision, compile=args.compile, threads=args.threads)
                 for m in args.models for a in args.attn]
        header = report_header("studies.bench_train", argv)
        results = []
        for case in tqdm(cases, desc="bench-train", unit="case"):
            if args.in_process:
                results.append(run_case(case))
                continue
            try:
                results.append(run_case_in_subprocess("studies.bench_train", case))
            except T2TError as e:
                print(e, file=sys.stderr)
                results.append({**case, "error": str(e).strip().splitlines()[-1]})
        tag = "gpu" if gpu else "cpu"
        report = {**header, "what": "training step (fwd + loss + bwd + AdamW), random inputs, 1000 classes, "
                                    "drop_path 0.1", "torch_threads": args.threads or torch.get_num_threads(),
                  "load_average_end": load_average(), "results": results}
        if not gpu:
            report["note"] = (f"CPU only: no GPU was available for this run. img {img} px (224 px would take minutes "
                              f"per case on this CPU); the same command on a GPU uses 224 px and bf16 autocast.")
        lines = render_markdown(report, tag)
        write_report(Path(args.out) / f"bench-train-{tag}", report, "\n".join(lines))
        print("\n".join(lines))
        if any("error" in r for r in results):
            raise T2TError("some benchmark cases failed (see the report)")
        return 0

    return run_command(body, "studies.bench_train")


if __name__ == "__main__":
    sys.exit(main())
