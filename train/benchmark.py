"""Training throughput (img/s) and peak memory per model, SDPA vs explicit attention, in one run.

    python -m train.benchmark                          # CPU: t2t_vit_7 and t2t_vit_t_14 at 112 px
    python -m train.benchmark --img-size 224 --batch-size 64 --compile   # on a GPU: bf16 autocast

One training step = forward + loss + backward + AdamW step (timm optimizer factory, the recipe's
no-weight-decay rules), on random inputs of the model's shape, so data loading is excluded. Each
(model, attention) case runs in a fresh subprocess so its peak memory is its own: on CPU the
process's peak RSS, on a GPU ``torch.cuda.max_memory_allocated``. Writes
``<out>/bench-train-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training throughput and peak memory, SDPA vs explicit attention",
                                add_help=add_help)
    p.add_argument("--models", nargs="+", default=["t2t_vit_7", "t2t_vit_t_14"])
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: 112 on CPU, where 224 takes minutes per case on 2 cores; 224 on GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 30 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--attn", nargs="+", default=["sdpa", "explicit"], choices=["sdpa", "explicit"])
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (faster start; peak memory is then cumulative)")
    p.add_argument("--out", default="reports")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    return p


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Time ``steps`` training steps of one model/attention configuration in this process."""
    import timm

    import t2t_vit  # noqa: F401
    from timm.optim import create_optimizer_v2

    from .train import peak_memory_mib, resolve_precision

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

    for _ in range(case["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {**case, "img_per_s": round(b / median, 2), "step_ms_median": round(1000 * median, 1),
            "step_ms_min": round(1000 * times[0], 1), "peak_mem_mib": round(peak_memory_mib(device), 1),
            "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "final_loss": round(loss, 4), "precision_resolved": str(amp_dtype or "fp32")}


def render_markdown(report: dict[str, Any], tag: str) -> list[str]:
    """The Markdown table of a benchmark report (one row per model x attention path)."""
    hw = report["hardware"]
    hw_line = (f"{hw['gpu'] or hw['cpu']} ({hw['cpu_cores']} cores visible, {hw['torch_threads']} torch threads), "
               f"torch {hw['torch']}, load average {hw['load_average_1_5_15']} at the end of the run")
    lines = [f"# Training throughput ({tag})", "", f"Hardware: {hw_line}.", "", report["what"] + ".", ""]
    if "note" in report:
        lines += [report["note"], ""]
    if hw["load_average_1_5_15"][0] > (hw["cpu_cores"] or 1):
        lines += [f"The machine was shared: a load average above its {hw['cpu_cores']} cores means other jobs took most "
                  f"of the CPU, so absolute numbers are several times below an idle machine's and differences "
                  f"between rows of less than ~30% are noise.", ""]
    lines += ["| model | attention | img | batch | precision | img/s | step ms (median) | peak mem MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['attn']} | {r['img_size']} | {r['batch_size']} | - | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['attn']} | {r['img_size']} | {r['batch_size']} | {r['precision_resolved']} "
                         f"| {r['img_per_s']} | {r['step_ms_median']} | {r['peak_mem_mib']} ({r['peak_mem_kind']}) |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0
    from tqdm import tqdm

    from t2t_vit.files import atomic_write_text
    from .validate import hardware

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    img = args.img_size or (224 if gpu else 112)
    bs = args.batch_size or (64 if gpu else 16)
    steps = args.steps or (30 if gpu else 5)
    cases = [dict(model=m, attn=a, device=device, img_size=img, batch_size=bs, steps=steps, warmup=args.warmup,
                  precision=args.precision, compile=args.compile, threads=args.threads)
             for m in args.models for a in args.attn]
    results = []
    for case in tqdm(cases, desc="bench-train", unit="case"):
        if args.in_process:
            results.append(run_case(case))
            continue
        proc = subprocess.run([sys.executable, "-m", "train.benchmark", "--worker", json.dumps(case)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            results.append({**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    hw = hardware()
    # Other jobs on a shared machine slow every case alike; the load average says how busy it was.
    hw["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    hw["torch_threads"] = args.threads or torch.get_num_threads()
    tag = "gpu" if gpu else "cpu"
    report = {"what": "training step (fwd + loss + bwd + AdamW), random inputs, 1000 classes, drop_path 0.1",
              "hardware": hw, "timm": __import__("timm").__version__, "results": results}
    if not gpu:
        report["note"] = (f"CPU only: no GPU was available for this run. img {img} px (224 px would take minutes per "
                          f"case on this CPU); the same command on a GPU uses 224 px and bf16 autocast.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"bench-train-{tag}.json", json.dumps(report, indent=2) + "\n")
    lines = render_markdown(report, tag)
    atomic_write_text(out / f"bench-train-{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
