"""Model-package benchmark: SDPA vs explicit attention, and fp32 forward throughput.

Measures, in one run on one machine:

* t2t_vit_t_14 (whose first token transformer attends over 3136 tokens at 224 px): forward latency and
  peak memory of forward+backward with ``F.scaled_dot_product_attention`` vs the explicit
  MatMul-Softmax-MatMul path (which stores the 3136 x 3136 map);
* fp32 eval forward throughput (img/s) of t2t_vit_7 and t2t_vit_14;
* on a CUDA GPU also a bf16-autocast training step (img/s, peak memory).

Peak memory is :class:`t2t_vit.timing.PeakMemory`'s growth over the memory in use just before the
measured steps (CPU: peak resident set, ``ru_maxrss``; GPU: ``torch.cuda.max_memory_allocated``), each
case in a fresh subprocess so cases do not share a high-water mark.

Usage: ``python -m studies model --out reports`` (``make bench-model``) writes
``reports/bench-model-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

from t2t_vit.cli import comma_list, run_command
from t2t_vit.model import ARCHS, ModelConfigError  # importing the model module registers the models with timm
from t2t_vit.reports import host_line, markdown_table, report_header, write_report
from t2t_vit.timing import PeakMemory, run_case_in_subprocess, time_calls


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement; meant to run in its own process (see ``--case``)."""
    device = torch.device(case["device"])
    torch.manual_seed(0)
    model = timm.create_model(case["model"], img_size=case["img_size"]).to(device)
    model.set_fused_attn(case["attention"] == "sdpa")
    x = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = dict(case)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.get("amp") == "bf16")

    if case["kind"] == "forward":
        model.eval()

        def fn():
            with torch.no_grad(), autocast:
                model(x)

        times = time_calls(fn, warmup=case["warmup"], min_iters=case["iters"], min_time_s=0, max_iters=case["iters"],
                           sync=sync)
        med = statistics.median(times)
        out.update(latency_ms_median=1e3 * med, latency_ms_min=1e3 * min(times),
                   images_per_s=case["batch"] / med)
    elif case["kind"] == "train_step":
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def fn():
            with autocast:
                loss = model(x).float().logsumexp(1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fn()  # allocate optimizer state before the memory baseline
        sync()
        with PeakMemory(device) as mem:
            times = time_calls(fn, warmup=case["warmup"], min_iters=case["iters"], min_time_s=0,
                               max_iters=case["iters"], sync=sync)
        med = statistics.median(times)
        out.update(step_ms_median=1e3 * med, images_per_s=case["batch"] / med, peak_mem_mib=mem.growth_mib,
                   peak_mem_kind=f"{mem.kind}, growth over the start of the measured steps")
    else:
        raise ValueError(f"unknown case kind {case['kind']!r}")
    return out


def build_cases(device: str, quick: bool, attn_model: str = "t2t_vit_t_14",
                throughput_models: tuple[str, ...] = ("t2t_vit_7", "t2t_vit_14"), img: int = 224) -> list[dict[str, Any]]:
    warm, iters = (1, 2) if quick else (2, 5)
    cases = []
    for attention in ("sdpa", "explicit"):
        cases.append(dict(kind="forward", model=attn_model, attention=attention, batch=8, img_size=img,
                          device=device, warmup=warm, iters=iters))
        cases.append(dict(kind="train_step", model=attn_model, attention=attention, batch=8 if device == "cpu" else 64,
                          img_size=img, device=device, warmup=1, iters=iters,
                          amp="bf16" if device == "cuda" else None))
    for model in throughput_models:
        for batch in (1, 8):
            cases.append(dict(kind="forward", model=model, attention="sdpa", batch=batch, img_size=img, device=device,
                              warmup=warm, iters=iters))
    if device == "cuda":
        for model in (throughput_models[0], attn_model):
            cases.append(dict(kind="train_step", model=model, attention="sdpa", batch=128, img_size=img,
                              device=device, warmup=3, iters=10, amp="bf16"))
    return cases


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Model benchmark ({report['device']})", "", f"`{report['command']}`", "",
             f"Host: {host_line(report['host'])}; {report['host']['torch_threads']} torch threads.", "",
             f"## SDPA vs explicit attention ({report['attn_model']}, {report['img_size']} px)", ""]
    attn = [[r["kind"], r["batch"], r["attention"], f"{r.get('latency_ms_median', r.get('step_ms_median')):.1f}",
             f"{r['images_per_s']:.1f}", f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "-"]
            for r in report["results"]
            if r["model"] == report["attn_model"] and not (r["attention"] == "sdpa" and r["batch"] == 128)]
    lines += [markdown_table(["case", "batch", "attention", "median ms", "img/s", "peak mem MiB"], attn), ""]
    lines += [f"- {key}: **{value:.2f}x**" for key, value in report["ratios"].items()]
    fwd = [[r["model"], r["batch"], f"{r['latency_ms_median']:.1f}", f"{r['images_per_s']:.1f}"]
           for r in report["results"] if r["kind"] == "forward" and r["model"] in report["throughput_models"]]
    lines += ["", "## fp32 forward throughput (eval, SDPA)", "",
              markdown_table(["model", "batch", "median ms", "img/s"], fwd)]
    gpu_train = [r for r in report["results"] if r["kind"] == "train_step" and r["batch"] == 128]
    if gpu_train:
        lines += ["", "## GPU training step (bf16 autocast)", "",
                  markdown_table(["model", "batch", "img/s", "peak MiB"],
                                 [[r["model"], r["batch"], f"{r['images_per_s']:.0f}", f"{r['peak_mem_mib']:.0f}"]
                                  for r in gpu_train])]
    elif report["device"] == "cpu":
        lines += ["", "No GPU was available for this run; on a CUDA machine the same command adds bf16 training-step "
                      "throughput and peak memory."]
    return "\n".join(lines) + "\n"


def _ratios(results: list[dict[str, Any]], attn_model: str) -> dict[str, float]:
    def pick(kind, attention):
        return next(r for r in results if r["model"] == attn_model and r["kind"] == kind
                    and r["attention"] == attention and r["batch"] in (8, 64))

    fwd_s, fwd_e = pick("forward", "sdpa"), pick("forward", "explicit")
    tr_s, tr_e = pick("train_step", "sdpa"), pick("train_step", "explicit")
    return {
        "forward speed-up of SDPA over explicit (latency explicit / SDPA)": fwd_e["latency_ms_median"] / fwd_s["latency_ms_median"],
        "training-step speed-up of SDPA over explicit": tr_e["step_ms_median"] / tr_s["step_ms_median"],
        "peak-memory reduction of SDPA (explicit / SDPA, forward+backward)": tr_e["peak_mem_mib"] / max(tr_s["peak_mem_mib"], 1e-6),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="reports", help="folder for bench-model-<device>.{json,md}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (for smoke tests)")
    p.add_argument("--attn-model", default="t2t_vit_t_14", help="model for the SDPA vs explicit comparison")
    p.add_argument("--throughput-models", type=comma_list(str), default=["t2t_vit_7", "t2t_vit_14"],
                   help="models for the fp32 forward throughput table, comma-separated")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.case:
        Path(args.case_out).write_text(json.dumps(run_case(json.loads(args.case))))
        return 0

    def body() -> int:
        unknown = [m for m in [args.attn_model, *args.throughput_models] if m not in ARCHS]
        if unknown:
            raise ModelConfigError(f"unknown models {unknown}; registered: {', '.join(ARCHS)}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cases = build_cases(device, args.quick, args.attn_model, tuple(args.throughput_models), args.img_size)
        header = report_header("studies.bench_model", argv)
        results = [run_case_in_subprocess("studies.bench_model", c) for c in tqdm(cases, desc="bench-model", unit="case")]
        report = {
            **header,
            "device": device,
            "results": results,
            "attn_model": args.attn_model,
            "throughput_models": list(args.throughput_models),
            "img_size": args.img_size,
            "ratios": _ratios(results, args.attn_model),
        }
        stem = f"bench-model-{device}" if args.img_size == 224 else f"bench-model-{device}-{args.img_size}px"
        md = to_markdown(report)
        write_report(Path(args.out) / stem, report, md)
        print(md)
        return 0

    return run_command(body, "studies.bench_model")


if __name__ == "__main__":
    sys.exit(main())
