"""Everything this project wants from a few minutes on a lent CUDA machine, in one command and one report.

    python -m studies.gpu_check --pack artifacts/gpu-pack --checkpoint runs/imagenette-t2t_vit_7-224/best.pth
    python -m studies.gpu_check --checkpoint artifacts/gpu-pack/weights.pth --data artifacts/gpu-pack/val  # on the GPU
    python -m studies.gpu_check --dry-run        # on a CPU: every section with the tiny models, seconds

Sections (``reports/gpu-check.{json,md}``; the dry run writes ``gpu-check-dry-run.*``):

1. ``parity``: golden logits = the authors' formulation (:mod:`studies.authors`) in float64 on the CPU, for
   two variants (t2t_vit_7: Performer; t2t_vit_t_14: token transformer) at 224 px with weights and inputs
   drawn by numpy (the same on every machine and PyTorch version); our model on CUDA in fp32 (TF32 off),
   SDPA and explicit attention, must match them to 1e-4 of the logit scale.
2. ``autocast``: fp16 and bf16 autocast against fp32 on real val images with a checkpoint (the 224 px
   reference); skipped with a note when no checkpoint or images are given.
3. ``train``: training throughput and peak memory of t2t_vit_t_14 at 224 px in bf16 autocast: our model
   with SDPA, with explicit attention, and the authors' formulation (explicit softmax, scale after q k^T).
4. ``compile``: the same training step under ``torch.compile`` (SDPA), time to the first step included.

The machine has no network and carries 64 MiB: ``--pack DIR`` (on the development machine) writes the
checkpoint's weights alone and a class-balanced sample of val images into DIR, which fits.
Without CUDA, and without ``--dry-run``, the command fails with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import functools
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

import t2t_vit  # noqa: F401  (registers the models)
from t2t_vit.checkpoint import build_model, checkpoint_meta, extract_state_dict, preferred_weights, read_checkpoint
from t2t_vit.cli import run_command
from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset, scan_image_folder
from t2t_vit.errors import T2TError, ThresholdMissed
from t2t_vit.files import OutputLock, atomic_torch_save, ensure_dir, file_sha256
from t2t_vit.labels import label_space, model_class_names
from t2t_vit.model import ARCHS
from t2t_vit.reports import host_line, markdown_table, report_header, write_report
from studies.bench_train import run_case, time_steps

from . import authors as authors_module
from .authors import authors_forward
from evaluation.precision import _compare

__all__ = ["golden_weights", "golden_parity", "autocast_agreement", "train_throughput", "write_pack", "main"]

PARITY_TOL = 1e-4  # max |dlogit| / logit scale, fp32 on CUDA with TF32 off against float64
FULL = dict(parity_models=("t2t_vit_7", "t2t_vit_t_14"), img=224, parity_batch=4, train_model="t2t_vit_t_14",
            train_batch=64, steps=20, warmup=3, limit=500)
DRY = dict(parity_models=("t2t_vit_test", "t2t_vit_t_test"), img=64, parity_batch=2, train_model="t2t_vit_t_test",
           train_batch=4, steps=2, warmup=1, limit=8)


class NoCuda(T2TError):
    """No CUDA device and no --dry-run."""


# ----------------------------------------------------------------------------------------------------
# 1. golden parity
# ----------------------------------------------------------------------------------------------------
def golden_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` drawn by numpy (``default_rng(seed)``), so every machine and PyTorch version
    builds the same weights: Linear weights and biases, class token ~ N(0, 0.02); LayerNorm scales
    ~ N(1, 0.1); Performer ``w`` an orthogonal matrix scaled by sqrt(m); the position table the model's own."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            out[k] = v.clone()
        elif k.endswith(".w") and v.ndim == 2:  # Performer random features (m, emb)
            q, _ = np.linalg.qr(rng.standard_normal((v.shape[1], v.shape[0])))
            out[k] = torch.from_numpy(q.T * math.sqrt(v.shape[0])).float()
        elif "norm" in k and k.endswith(".weight") and v.ndim == 1:
            out[k] = torch.from_numpy(1.0 + 0.1 * rng.standard_normal(v.shape)).float()
        else:
            out[k] = torch.from_numpy(0.02 * rng.standard_normal(tuple(v.shape))).float()
    return out


def golden_parity(device: torch.device, models: Sequence[str], img: int, batch: int) -> list[dict[str, Any]]:
    """Per model and attention path: our model on ``device`` (fp32, TF32 off) against the authors'
    formulation in float64 on the CPU, on the same numpy weights and inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((batch, 3, img, img))).float()
    for name in models:
        model = timm.create_model(name, num_classes=1000, img_size=img).eval()
        sd = golden_weights(model)
        model.load_state_dict(sd)
        arch = ARCHS[name]
        with torch.no_grad():
            golden = authors_forward({k: v.double() for k, v in sd.items()}, x.double(), arch["num_heads"],
                                     arch["tokens_type"])
        scale = float(golden.abs().max())
        model.to(device)
        for fused in (True, False):
            model.set_fused_attn(fused)
            with torch.no_grad():
                got = model(x.to(device)).double().cpu()
            d = float((got - golden).abs().max())
            rows.append({"model": name, "attention": "sdpa" if fused else "explicit", "img_size": img,
                         "images": batch, "logit_scale": scale, "max_abs_dlogit": d, "rel": d / scale,
                         "top1_agreement": 100.0 * float((got.argmax(1) == golden.argmax(1)).double().mean()),
                         "passed": d / scale <= PARITY_TOL})
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. autocast agreement on real images
# ----------------------------------------------------------------------------------------------------
def autocast_agreement(device: torch.device, checkpoint: str, data: str, limit: int,
                       batch_size: int = 100) -> dict[str, Any]:
    """fp16 and bf16 autocast (Performer core fp32, the default; and fp16 without it) against fp32 with TF32
    off, on ``limit`` class-balanced images of ``data`` at the checkpoint's own size."""
    name = checkpoint_meta(read_checkpoint(checkpoint)).get("model") or "t2t_vit_7"
    model = build_model(name, checkpoint).eval().to(device)
    root = Path(data)
    folders = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    index, _ = label_space(folders, model_class_names(model), int(model.num_classes))
    samples, _ = scan_image_folder(root, index)
    samples = class_balanced_subset(samples, min(limit, len(samples)), seed=0, what="--limit")
    xs, ys = [], []
    for x, y, _ in ImageBatcher(samples, DataConfig.from_model(model), batch_size=batch_size, num_workers=0):
        xs.append(x)
        ys.append(y.numpy())
    labels = np.concatenate(ys)
    torch.backends.cuda.matmul.allow_tf32 = False

    def logits(dtype: torch.dtype | None) -> np.ndarray:
        out = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for x in xs:
                out.append(model(x.to(device)).float().cpu().numpy())
        return np.concatenate(out)

    ref = logits(None)
    rows = [_compare("fp16 autocast (Performer core fp32)", ref, logits(torch.float16), labels),
            _compare("bf16 autocast (Performer core fp32)", ref, logits(torch.bfloat16), labels)]
    model.set_performer_fp32_core(False)
    rows.append(_compare("fp16 autocast, Performer core in fp16", ref, logits(torch.float16), labels))
    fp32 = _compare("fp32 (reference, TF32 off)", ref, ref, labels)
    return {"model": name, "checkpoint": checkpoint, "checkpoint_sha256": file_sha256(checkpoint),
            "img_size": int(model.img_size), "data": str(root), "images": int(len(labels)), "rows": [fp32] + rows}


# ----------------------------------------------------------------------------------------------------
# 3./4. training throughput
# ----------------------------------------------------------------------------------------------------
_cached_sinusoid = functools.lru_cache(maxsize=8)(authors_module.numpy_sinusoid)


class AuthorsTrainable(nn.Module):
    """The authors' formulation (:func:`studies.authors.authors_forward`) with trainable weights: ``model``'s
    parameters, frozen where the model's are (Performer ``w``, ``pos_embed``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        arch = {k: getattr(model, k, None) for k in ("tokens_type",)}
        self.tokens_type = arch["tokens_type"]
        self.num_heads = model.blocks[0].attn.num_heads
        named = dict(model.named_parameters())
        self.names = list(named)
        self.weights = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                                         for p in named.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The authors build their sinusoid table once, at init; studies.authors (a pure function of a state
        # dict) rebuilds it in Python on every call, 0.1-0.3 s, which would be timed as the formulation's cost.
        rebuild = authors_module.numpy_sinusoid
        authors_module.numpy_sinusoid = _cached_sinusoid
        try:
            return authors_forward(dict(zip(self.names, self.weights)), x, self.num_heads, self.tokens_type)
        finally:
            authors_module.numpy_sinusoid = rebuild


def _time_authors(case: dict[str, Any]) -> dict[str, Any]:
    """Training steps of :class:`AuthorsTrainable` (bf16 autocast, AdamW), timed by ``bench_train.time_steps``."""
    device = torch.device(case["device"])
    torch.manual_seed(0)
    model = AuthorsTrainable(timm.create_model(case["model"], num_classes=1000, img_size=case["img_size"]))
    model.to(device).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    b, s = case["batch_size"], case["img_size"]
    x, y = torch.randn(b, 3, s, s, device=device), torch.randint(0, 1000, (b,), device=device)
    crit = nn.CrossEntropyLoss()

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return {**case, **time_steps(step, device, b, case["warmup"], case["steps"]),
            "precision_resolved": "torch.bfloat16"}


def train_throughput(device: torch.device, model: str, img: int, batch: int, steps: int, warmup: int,
                     compile_: bool) -> list[dict[str, Any]]:
    """Training img/s and peak memory in bf16 autocast: ours with SDPA and explicit attention, the authors'
    formulation, and (``compile_``) ours with SDPA under torch.compile (wall time to the first step too)."""
    base = dict(model=model, device=str(device), img_size=img, batch_size=batch, steps=steps, warmup=warmup,
                precision="bf16", compile=False, threads=None)
    rows = [{**run_case({**base, "attn": a}), "formulation": f"ours, {a}"} for a in ("sdpa", "explicit")]
    rows.append({**_time_authors({**base, "attn": "authors"}), "formulation": "authors' (explicit, einsum Performer)"})
    if compile_:
        t0 = time.perf_counter()
        row = run_case({**base, "attn": "sdpa", "compile": True})
        rows.append({**row, "formulation": "ours, sdpa, torch.compile",
                     "wall_s_with_compile": round(time.perf_counter() - t0, 1)})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# the pack and the command
# ----------------------------------------------------------------------------------------------------
def write_pack(out: Path, checkpoint: str, data: str, limit: int) -> list[Path]:
    """``out/weights.pth`` (the checkpoint's preferred weights and metadata only: no optimizer, no EMA twin) and
    ``out/val/<class>/`` with ``limit`` class-balanced images of ``data``: what a lent machine needs."""
    obj = read_checkpoint(checkpoint)
    weights = preferred_weights(obj)
    state = {"state_dict": extract_state_dict(obj, weights=weights), "weights": "model",
             "meta": checkpoint_meta(obj)}
    ensure_dir(out)
    written = [atomic_torch_save(state, out / "weights.pth")]
    samples, classes = scan_image_folder(Path(data))
    for s in class_balanced_subset(samples, min(limit, len(samples)), seed=0, what="--limit"):
        dest = out / "val" / classes[s.label] / Path(s.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, dest)
        written.append(dest)
    return written


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# GPU check{' (dry run on the CPU: tiny models, no GPU numbers)' if r['dry_run'] else ''}", "",
             f"`{r['command']}`", "", f"Host: {host_line(r['host'])}; device `{r['device']}`.", "",
             "## 1. Golden-logit parity", "",
             f"Golden = the authors' formulation in float64 on the CPU; ours in fp32 on `{r['device']}` with TF32 off; "
             f"numpy-drawn weights and inputs. Pass: max |dlogit| <= {PARITY_TOL:g} x the logit scale.", ""]
    sec = r["sections"]
    if "error" in sec.get("parity", {}):
        lines += [f"error: {sec['parity']['error']}", ""]
    else:
        lines += [markdown_table(["model", "attention", "img", "images", "logit scale", "max abs dlogit",
                                  "/ scale", "top-1 agreement %", "pass"],
                                 [[p["model"], p["attention"], p["img_size"], p["images"], p["logit_scale"],
                                   p["max_abs_dlogit"], p["rel"], p["top1_agreement"],
                                   "yes" if p["passed"] else "**NO**"] for p in sec["parity"]["rows"]]), ""]
    lines += ["## 2. fp16 and bf16 autocast on real images", ""]
    a = sec.get("autocast", {})
    if a.get("skipped") or a.get("error"):
        lines += [a.get("skipped") or f"error: {a['error']}", ""]
    else:
        lines += [f"{a['model']} at {a['img_size']} px, `{a['checkpoint']}` (sha256 `{a['checkpoint_sha256']}`), "
                  f"{a['images']} images from `{a['data']}`; against fp32 on the same device.", "",
                  markdown_table(["variant", "top-1 %", "delta top-1", "top-1 agreement %", "max abs dlogit",
                                  "non-finite images"],
                                 [[x["variant"], x["top1"], x["delta_top1"], x["top1_agreement"], x["max_abs_dlogit"],
                                   x["nonfinite_images"]] for x in a["rows"]]), ""]
    lines += ["## 3./4. Training throughput (bf16 autocast), torch.compile", ""]
    t = sec.get("train", {})
    if t.get("error"):
        lines += [f"error: {t['error']}", ""]
    else:
        lines += ["One step = forward + loss + backward + AdamW on random inputs, 1000 classes (studies.bench_train's "
                  "loop; ours with drop path 0.1, the authors' formulation without).", "",
                  markdown_table(["model", "formulation", "img", "batch", "img/s", "step ms (median)",
                                  "peak mem MiB", "wall s incl. compile"],
                                 [[x["model"], x["formulation"], x["img_size"], x["batch_size"], x["img_per_s"],
                                   x["step_ms_median"], x["peak_mem_mib"], x.get("wall_s_with_compile")]
                                  for x in t.get("rows", [])]), ""]
        if t.get("note"):
            lines += [t["note"], ""]
    lines += [f"Total wall time: {r['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def _section(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded in the report (the others still run on the lent machine)."""
    try:
        report["sections"][name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing section must not lose the machine's other results
        report["sections"][name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    if not args.dry_run and not torch.cuda.is_available():
        raise NoCuda("no CUDA device visible to PyTorch (torch.cuda.is_available() is False); run this on the lent "
                     "GPU machine, or pass --dry-run to check the script on a CPU")
    plan = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise T2TError(f"--checkpoint {args.checkpoint} does not exist (omit it to skip the autocast section)")
    if args.data and not Path(args.data).is_dir():
        raise T2TError(f"--data {args.data} is not a folder (an ImageFolder of val images, e.g. a --pack's val/)")
    t0 = time.perf_counter()
    report: dict[str, Any] = {**report_header("studies.gpu_check", argv), "dry_run": bool(args.dry_run),
                              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                              "sections": {}}
    _section(report, "parity", lambda: {"rows": golden_parity(device, plan["parity_models"], plan["img"],
                                                              plan["parity_batch"])})
    if args.checkpoint and args.data:
        _section(report, "autocast", lambda: autocast_agreement(device, args.checkpoint, args.data,
                                                                args.limit or plan["limit"]))
    else:
        report["sections"]["autocast"] = {"skipped": "skipped: needs --checkpoint (the 224 px reference, e.g. a "
                                                     "--pack's weights.pth) and --data (val images)"}
    compile_ = not args.dry_run and not args.no_compile

    def train() -> dict[str, Any]:
        rows = train_throughput(device, plan["train_model"], plan["img"], args.batch_size or plan["train_batch"],
                                args.steps or plan["steps"], plan["warmup"], compile_)
        note = None if compile_ else ("torch.compile: not run (" + ("dry run: compiling needs minutes on a CPU"
                                                                    if args.dry_run else "--no-compile") + ")")
        return {"rows": rows, "note": note}

    _section(report, "train", train)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    stem = Path(args.out) / ("gpu-check-dry-run" if args.dry_run else "gpu-check")
    with OutputLock(args.out):
        report["written"] = [str(p) for p in write_report(stem, report, _markdown(report))]
    return report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One lent-GPU session of evidence: golden parity, autocast agreement, "
                                            "training throughput, torch.compile", add_help=add_help)
    p.add_argument("--checkpoint", default=None, help="the 224 px reference checkpoint (or a --pack's weights.pth); "
                                                      "without it the autocast section is skipped")
    p.add_argument("--data", default=None, help="val images (ImageFolder; a --pack's val/); without it the autocast "
                                                "section is skipped")
    p.add_argument("--limit", type=int, default=None, help="images for the autocast section (default 500; dry run 8)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 64; dry run 4)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per case (default 20; dry run 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    p.add_argument("--dry-run", action="store_true", help="on a CPU: every section with the tiny models, in seconds")
    p.add_argument("--pack", default=None, metavar="DIR",
                   help="write DIR/weights.pth (weights only) and DIR/val/ (--limit images, default 160) from "
                        "--checkpoint and --data, to carry to the GPU machine; nothing else runs")
    p.add_argument("--out", default="reports", help="report folder (default reports)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        if args.pack:
            if not (args.checkpoint and args.data):
                raise T2TError("--pack needs --checkpoint and --data (make gpu-pack GPU_CHECKPOINT=... DATA=...)")
            written = write_pack(Path(args.pack), args.checkpoint, args.data, args.limit or 160)
            mib = sum(p.stat().st_size for p in written) / 2**20
            print(f"wrote {args.pack}: weights.pth and {len(written) - 1} images, {mib:.1f} MiB (carry limit 64 MiB)")
            if mib > 60:
                raise T2TError(f"{args.pack} is {mib:.1f} MiB, too much to carry (64 MiB): lower --limit")
            return 0
        r = run(args, argv)
        print(_markdown(r))
        print("wrote " + ", ".join(r["written"]))
        failed = [name for name, s in r["sections"].items() if "error" in s]
        if failed:
            raise T2TError(f"sections failed: {', '.join(failed)} (see {r['written'][0]})")
        bad = [p for p in r["sections"]["parity"]["rows"] if not p["passed"]]
        if bad:
            raise ThresholdMissed(f"golden parity missed {PARITY_TOL:g} for {[(p['model'], p['attention']) for p in bad]}")
        return 0

    return run_command(body, "studies.gpu_check")


if __name__ == "__main__":
    sys.exit(main())
