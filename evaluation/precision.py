"""Precision evidence for the TensorRT path, measured with PyTorch on a CPU before any engine exists.

``make precision CHECKPOINT=... DATA=...`` (``python -m evaluation.precision``) writes three reports:

* ``precision-tf32-<model>``: TensorRT enables TF32 by default (``BuilderFlag.TF32``: MatMul/Conv inputs of
  float32 tensors rounded to a 10-bit mantissa, products accumulated in fp32). Emulated here by rounding
  the inputs of every ``torch.matmul``/``F.linear``/``F.conv2d`` to TF32 (round to nearest even) for
  (a) the whole fp32 model, (b) only the fp32 Performer island of an fp32 model, and (c) the island of
  the fp16 model (what an fp16/int8 engine built with TF32 on computes there).
* ``precision-layernorm-<model>``: under strong typing TensorRT computes LayerNormalization in its input
  type. Per LayerNorm of the model: max |x - mean|, max variance, max sum of squares, and their headroom to
  fp16's limits (squares overflow past |x - mean| = 256, sums past 65504); and the effect on top-1 and
  logits of a LayerNorm computed in fp16 (``fp16-math``: mean, squares and sums in fp16, tree-reduced as
  GPU kernels do) or with fp16 input/output and fp32 math (``fp16-io``), inside the fp16 model.
* ``activations-<model>``: what a quantization engineer asks for first: per LayerNorm input and per
  MatMul/Linear input, max |x|, the 99.99th percentile of |x| (estimated from a uniform sample) and the
  channels with the largest magnitude.

Every comparison runs on the same preprocessed images (the model's eval transform) against the fp32
model with plain fp32 arithmetic (no TF32: PyTorch's CPU matmuls are fp32).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.patterns import apply_export_patterns
from t2t_vit.checkpoint import build_model
from t2t_vit.cli import add_limit_arg, add_run_args, add_stage_args, apply_threads, comma_list, run_command
from t2t_vit.data import DataConfig, ImageBatcher, class_balanced_subset, imagenette_root, scan_image_folder
from t2t_vit.errors import T2TError
from t2t_vit.files import OutputLock, file_sha256
from t2t_vit.labels import label_space, model_class_names
from t2t_vit.layers import TokenPerformer
from t2t_vit.metrics import LogitStats
from t2t_vit.checkpoint import trained_like_
from t2t_vit.reports import host_line, markdown_table, pyplot, report_header, write_report

_logger = logging.getLogger(__name__)

__all__ = ["round_tf32", "tf32_matmuls", "fp16_layernorm", "layernorm_stats", "activation_stats",
           "performer_core_extremes", "performer_stats", "largest_safe_sizes", "sweep_model", "run_sweep", "main"]

FP16_MAX = 65504.0
DEFAULT_WHAT = ["tf32", "layernorm", "activations"]
SWEEP_DEFAULT_LIMIT = 100  # images per size: fp16 on a CPU is slow (t2t_vit_7 at 384 px: ~4 s per image and variant)


# ----------------------------------------------------------------------------------------------------
# TF32
# ----------------------------------------------------------------------------------------------------
def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 explicit mantissa bits, round to nearest even), as float32.

    inf and NaN pass through; a value whose rounding overflows becomes inf, as in hardware.
    """
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    lsb = (bits >> 13) & 1
    rounded = (bits + 0x0FFF + lsb) & ~0x1FFF
    return torch.where(finite, rounded, bits).view(torch.float32)


_TF32 = threading.local()


@contextlib.contextmanager
def tf32_matmuls(scope: str = "all") -> Iterator[None]:
    """Within the block, ``torch.matmul``/``F.linear``/``F.conv2d`` round their float32 inputs to TF32.

    ``scope="all"``: every such op; ``"performer"``: only inside ``TokenPerformer.linear_attention`` (the
    fp32 island); ``"none"``: nothing (the plain fp32 reference).
    """
    if scope not in ("all", "performer", "none"):
        raise ValueError(f"scope must be all, performer or none, got {scope!r}")
    matmul, linear, conv2d, island = torch.matmul, F.linear, F.conv2d, TokenPerformer.linear_attention

    def active() -> bool:
        return scope == "all" or (scope == "performer" and getattr(_TF32, "in_island", False))

    def r(t: Any) -> Any:
        return round_tf32(t) if isinstance(t, torch.Tensor) and active() else t

    def island_wrapper(self, k, q, v):
        _TF32.in_island = True
        try:
            return island(self, k, q, v)
        finally:
            _TF32.in_island = False

    patches: list[tuple[Any, str, Any]] = [
        (torch, "matmul", lambda a, b, **kw: matmul(r(a), r(b), **kw)),
        (F, "linear", lambda x, w, b=None: linear(r(x), r(w), b)),
        (F, "conv2d", lambda x, w, *a, **kw: conv2d(r(x), r(w), *a, **kw)),
        (TokenPerformer, "linear_attention", island_wrapper),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        if scope != "none":
            for obj, name, fn in patches:
                setattr(obj, name, fn)
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


# ----------------------------------------------------------------------------------------------------
# LayerNorm in fp16
# ----------------------------------------------------------------------------------------------------
def _tree_sum_fp16(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis with every partial sum rounded to fp16 (a pairwise reduction, as GPU
    kernels reduce across threads): overflows to inf when a partial sum passes 65504."""
    x = x.to(torch.float16)
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        head = (x[..., :half].float() + x[..., half:2 * half].float()).to(torch.float16)
        x = torch.cat([head, x[..., 2 * half:]], dim=-1) if n % 2 else head
    return x[..., 0:1]


def fp16_layernorm(mode: str) -> Callable[..., torch.Tensor]:
    """A ``F.layer_norm`` replacement: ``"fp16-math"`` (every step in fp16) or ``"fp16-io"`` (fp16 input
    and output, fp32 math)."""
    def fp16_math(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        n = x.shape[-1]
        x16 = x.to(torch.float16)
        mean = (_tree_sum_fp16(x16).float() / n).to(torch.float16)
        d = (x16.float() - mean.float()).to(torch.float16)
        sq = (d.float() * d.float()).to(torch.float16)
        var = (_tree_sum_fp16(sq).float() / n).to(torch.float16)
        rstd = (1.0 / torch.sqrt(var.float() + eps)).to(torch.float16)
        y = (d.float() * rstd.float()).to(torch.float16)
        if weight is not None:
            y = (y.float() * weight.to(torch.float16).float()).to(torch.float16)
        if bias is not None:
            y = (y.float() + bias.to(torch.float16).float()).to(torch.float16)
        return y.to(x.dtype)

    def fp16_io(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        y = _LAYER_NORM(x.to(torch.float16).float(), normalized_shape, None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps)
        return y.to(torch.float16).to(x.dtype)

    return {"fp16-math": fp16_math, "fp16-io": fp16_io}[mode]


_LAYER_NORM = F.layer_norm


@contextlib.contextmanager
def layernorm_mode(mode: str) -> Iterator[None]:
    """Every ``nn.LayerNorm`` computes as ``mode`` inside the block (``"fp32"``: unchanged)."""
    if mode == "fp32":
        yield
        return
    fn = fp16_layernorm(mode)
    F.layer_norm = fn
    try:
        yield
    finally:
        F.layer_norm = _LAYER_NORM


def _run_hooked(model: nn.Module, batches: Sequence[torch.Tensor], hooks: list[Any]) -> None:
    """Run every batch through ``model`` (no grad) with forward ``hooks`` installed, then remove them."""
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()


def layernorm_stats(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Per ``nn.LayerNorm`` (module order): max |x - mean|, max variance, max sum of squares over the
    normalized axis, and the headroom to fp16 (``fp16_headroom``: how many times larger the worst value
    could get before a square or a sum of squares passes 65504)."""
    stats: dict[str, dict[str, Any]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            def hook(m, inp, out, name=name):
                x = inp[0].detach().double()
                d = x - x.mean(dim=-1, keepdim=True)
                s = stats.setdefault(name, {"module": name, "width": int(x.shape[-1]), "max_abs_x": 0.0,
                                            "max_abs_dev": 0.0, "max_var": 0.0, "max_sum_sq": 0.0})
                s["max_abs_x"] = max(s["max_abs_x"], float(x.abs().max()))
                s["max_abs_dev"] = max(s["max_abs_dev"], float(d.abs().max()))
                s["max_var"] = max(s["max_var"], float((d * d).mean(-1).max()))
                s["max_sum_sq"] = max(s["max_sum_sq"], float((d * d).sum(-1).max()))
            hooks.append(mod.register_forward_hook(hook))
    _run_hooked(model, batches, hooks)
    out = []
    for s in stats.values():
        worst_square = s["max_abs_dev"] ** 2
        s["fp16_headroom_square"] = FP16_MAX / worst_square if worst_square > 0 else float("inf")
        s["fp16_headroom_sum_sq"] = FP16_MAX / s["max_sum_sq"] if s["max_sum_sq"] > 0 else float("inf")
        s["fp16_headroom"] = min(s["fp16_headroom_square"], s["fp16_headroom_sum_sq"])
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------------
# Activation statistics
# ----------------------------------------------------------------------------------------------------
def activation_stats(model: nn.Module, batches: Sequence[torch.Tensor], sample: int = 20000, top: int = 5,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Per LayerNorm input and per Linear input (module order): max |x|, the 99.99th percentile of |x|
    (from a uniform sample of ``sample`` values per batch), the ratio between them, and the ``top``
    channels (last axis) with the largest max |x| over tokens and images."""
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, dict[str, Any]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.Linear)):
            kind = "LayerNorm input" if isinstance(mod, nn.LayerNorm) else "Linear (MatMul) input"

            def hook(m, inp, out, name=name, kind=kind):
                x = inp[0].detach().float().abs()
                a = acc.setdefault(name, {"module": name, "kind": kind, "channels": int(x.shape[-1]),
                                          "max_abs": 0.0, "samples": [], "channel_max": None})
                a["max_abs"] = max(a["max_abs"], float(x.max()))
                flat = x.reshape(-1)
                idx = torch.randint(0, flat.numel(), (min(sample, flat.numel()),), generator=gen)
                a["samples"].append(flat[idx])
                cmax = x.reshape(-1, x.shape[-1]).amax(0)
                a["channel_max"] = cmax if a["channel_max"] is None else torch.maximum(a["channel_max"], cmax)
            hooks.append(mod.register_forward_hook(hook))
    _run_hooked(model, batches, hooks)
    out = []
    for a in acc.values():
        s = torch.cat(a.pop("samples")).double()
        p9999 = float(torch.quantile(s, 0.9999)) if s.numel() > 1 else float(s.max())
        cmax = a.pop("channel_max")
        values, idx = cmax.topk(min(top, cmax.numel()))
        median_channel = float(cmax.median())
        a.update(p9999_abs=p9999, max_over_p9999=a["max_abs"] / p9999 if p9999 > 0 else float("inf"),
                 median_channel_max=median_channel,
                 top_channels=[{"channel": int(i), "max_abs": float(v),
                                "x_median_channel": float(v) / median_channel if median_channel > 0 else None}
                               for v, i in zip(values, idx)])
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------------
# Resolution sweep: fp16 headroom as the token count grows
# ----------------------------------------------------------------------------------------------------
# The intermediates of TokenPerformer.linear_attention (the max-shifted form an fp16 core would compute),
# in the order they are made. Headroom is taken over these; the authors' unshifted formula is reported
# beside them for comparison (AUTHORS_TERMS), never judged.
CORE_TERMS = ("k_sq_sum", "q_sq_sum", "w_k", "w_q", "k_exponent", "exp_q", "exp_k", "k_sum", "q_times_k_sum",
              "D", "kv", "numerator", "eps", "D_plus_eps", "y")
AUTHORS_TERMS = ("phi_q", "phi_k", "sum_phi_k", "D", "numerator")
FP16_TINY_SUBNORMAL = 2.0 ** -24  # smaller magnitudes round to zero (or to 2^-24) in fp16
SWEEP_CHOICES = ("fp16_layernorm", "fp16_performer_core", "fp16_graph")
SWEEP_CHOICE_TEXT = {"fp16_layernorm": "fp16 LayerNorm (fp16-math)",
                     "fp16_performer_core": "fp16 Performer core (no fp32 island)",
                     "fp16_graph": "fp16 graph as exported (fp32 LayerNorm and Performer core)"}


def performer_core_extremes(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                            epsilon: float) -> dict[str, Any]:
    """Largest |value| of every intermediate of one Performer core call, in float64.

    ``max``: the max-shifted form this project computes (:meth:`t2t_vit.layers.TokenPerformer.linear_attention`):
    |k|^2 and |q|^2, w.k and w.q, the k exponent w.k - |k|^2/2, the exp features, their sum over tokens,
    the products phi(q) * sum phi(k) and their sum D, sum_s phi(k_s) v_s (``kv``), the numerator
    phi(q) kv, the rescaled epsilon, D + eps and the output. ``authors_max``: the released formula
    phi(x) = exp(w.x - |x|^2/2) / sqrt(m) with the sum over every token (what a plain fp16 port holds).
    ``exp_k_underflow``: the fraction of exp(k) features below fp16's smallest subnormal; ``min_D``.
    """
    k, q, v, w = (t.detach().double() for t in (k, q, v, w))
    m, tokens = w.shape[0], k.shape[1]
    log_t = math.log(tokens)
    k_sq, q_sq = (k * k).sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
    wk, wq = k @ w.t(), q @ w.t()
    b = wk - 0.5 * k_sq
    b_max, wq_max = b.amax(dim=(1, 2), keepdim=True), wq.amax(dim=-1, keepdim=True)
    qp, kp = torch.exp(wq - wq_max), torch.exp(b - (b_max + log_t))
    k_sum = kp.sum(dim=1, keepdim=True)
    prod = qp * k_sum
    d = prod.sum(-1, keepdim=True)
    kv = kp.transpose(1, 2) @ v
    num = qp @ kv
    eps = torch.exp((math.log(epsilon * m) - log_t) - (wq_max - 0.5 * q_sq + b_max))
    den = d + eps
    terms = dict(k_sq_sum=k_sq, q_sq_sum=q_sq, w_k=wk, w_q=wq, k_exponent=b, exp_q=qp, exp_k=kp, k_sum=k_sum,
                 q_times_k_sum=prod, D=d, kv=kv, numerator=num, eps=eps, D_plus_eps=den, y=num / den)
    phi_q, phi_k = torch.exp(wq - 0.5 * q_sq) / math.sqrt(m), torch.exp(b) / math.sqrt(m)
    sum_phi_k = phi_k.sum(dim=1, keepdim=True)
    authors = dict(phi_q=phi_q, phi_k=phi_k, sum_phi_k=sum_phi_k, D=(phi_q * sum_phi_k).sum(-1),
                   numerator=phi_q @ (phi_k.transpose(1, 2) @ v))
    return {"tokens": int(tokens), "max": {n: float(t.abs().max()) for n, t in terms.items()},
            "authors_max": {n: float(t.abs().max()) for n, t in authors.items()},
            "exp_k_underflow": float((kp < FP16_TINY_SUBNORMAL).double().mean()), "min_D": float(d.min())}


def performer_stats(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Per :class:`TokenPerformer` (module order), :func:`performer_core_extremes` over every batch (max of
    maxima; the underflow fraction averaged), with ``fp16_headroom`` = 65504 / the largest intermediate
    of the max-shifted form and ``worst`` naming it."""
    names = {id(mod): name for name, mod in model.named_modules() if isinstance(mod, TokenPerformer)}
    acc: dict[str, dict[str, Any]] = {}
    original = TokenPerformer.linear_attention

    def recording(self, k, q, v):
        e = performer_core_extremes(k, q, v, self.w, self.epsilon)
        a = acc.setdefault(names[id(self)], {"module": names[id(self)], "tokens": e["tokens"], "calls": 0,
                                             "max": {}, "authors_max": {}, "exp_k_underflow": 0.0,
                                             "min_D": math.inf})
        for key in ("max", "authors_max"):
            for n, val in e[key].items():
                a[key][n] = max(a[key].get(n, 0.0), val)
        a["exp_k_underflow"] += e["exp_k_underflow"]
        a["min_D"] = min(a["min_D"], e["min_D"])
        a["calls"] += 1
        return original(self, k, q, v)

    TokenPerformer.linear_attention = recording
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        TokenPerformer.linear_attention = original
    out = []
    for a in acc.values():
        a["exp_k_underflow"] /= max(a.pop("calls"), 1)
        a["worst"] = max(a["max"], key=a["max"].get)
        a["fp16_headroom"] = FP16_MAX / a["max"][a["worst"]] if a["max"][a["worst"]] > 0 else math.inf
        a["authors_fp16_headroom"] = FP16_MAX / max(a["authors_max"].values())
        out.append(a)
    return out


def sweep_model(name: str, checkpoint: str | None, size: int, weights: str | None = None) -> nn.Module:
    """The model the sweep measures at ``size`` (the exported forms, eval mode). Without a checkpoint: seeded
    random weights made trained-like (nonzero biases and LayerNorm affines), the same at every size."""
    if checkpoint is None:
        torch.manual_seed(0)
    model = apply_export_patterns(build_model(name, checkpoint, img_size=size, weights=weights))
    if checkpoint is None:
        trained_like_(model)
    return model.eval()


def _sweep_size(args: argparse.Namespace, size: int, samples: list[Any]) -> dict[str, Any]:
    """Every measurement of the sweep at one input size, the same weights and images."""
    model = sweep_model(args.model, args.checkpoint, size, args.weights)
    xs, labels = _batches(samples, model, args)
    t2t = model.tokens_to_token
    ln, perf = layernorm_stats(model, xs), performer_stats(model, xs)
    ref = _logits(model, xs)
    half = _half(model)
    rows = [_compare(SWEEP_CHOICE_TEXT["fp16_graph"], ref, _logits(half, xs, torch.float16), labels)]
    with layernorm_mode("fp16-math"):
        rows.append(_compare(SWEEP_CHOICE_TEXT["fp16_layernorm"], ref, _logits(half, xs, torch.float16), labels))
    if perf:
        half.set_performer_fp32_core(False)
        rows.append(_compare(SWEEP_CHOICE_TEXT["fp16_performer_core"], ref, _logits(half, xs, torch.float16), labels))
    by_choice = {"fp16_graph": rows[0], "fp16_layernorm": rows[1], **({"fp16_performer_core": rows[2]} if perf else {})}
    headroom = {"fp16_layernorm": min(s["fp16_headroom"] for s in ln),
                "fp16_performer_core": min((p["fp16_headroom"] for p in perf), default=None),
                "fp16_graph": None}
    safe = {}
    for choice, row in by_choice.items():
        h = headroom[choice]
        safe[choice] = bool((h is None or h >= args.min_headroom) and row["top1_agreement"] >= args.min_agreement
                            and not row["nonfinite_images"])
    return {"img_size": size, "images": int(len(labels)),
            "tokens": {"attention1": t2t.grid1 ** 2, "attention2": t2t.grid2 ** 2, "backbone": t2t.num_patches + 1},
            "layernorms": ln, "performers": perf, "min_headroom": headroom, "rows": rows, "safe": safe}


def largest_safe_sizes(sizes: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per fp16 choice, the largest swept size up to which it is safe at every swept size (None: not even at
    the smallest; a choice the model does not have is left out)."""
    out: dict[str, int | None] = {}
    for choice in SWEEP_CHOICES:
        best = None
        for s in sorted(sizes, key=lambda s: s["img_size"]):
            if choice not in s["safe"]:
                break
            if not s["safe"][choice]:
                break
            best = s["img_size"]
        if any(choice in s["safe"] for s in sizes):
            out[choice] = best
    return out


def run_sweep(args: argparse.Namespace, argv: Sequence[str] | None, threads: int) -> dict[str, Any]:
    """``--what sweep``: :func:`_sweep_size` at every ``--sweep`` size -> ``precision-sweep-<model>.*``."""
    from tqdm import tqdm

    first = build_model(args.model, args.checkpoint, img_size=args.sweep[0], weights=args.weights)
    samples, root = _samples(args, first)
    weights = first.pretrained_cfg.get("weights", "random") if args.checkpoint else "random (trained-like)"
    sizes = [_sweep_size(args, size, samples) for size in tqdm(args.sweep, desc="sweep", unit="size",
                                                                disable=args.no_progress)]
    report = {**report_header("evaluation.precision", argv), "model": args.model, "checkpoint": args.checkpoint,
              "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None, "weights": weights,
              "data": root, "threads": threads, "criteria": {"min_headroom": args.min_headroom,
                                                             "min_top1_agreement": args.min_agreement},
              "sizes": sizes, "largest_safe": largest_safe_sizes(sizes)}
    out = Path(args.out)
    with OutputLock(out):
        written = write_report(out / f"precision-sweep-{args.model}", report, _sweep_markdown(report),
                               _sweep_figure(report))
    return {"written": [str(p) for p in written]}


def _sweep_markdown(r: dict[str, Any]) -> str:
    crit = r["criteria"]
    lines = ["# fp16 headroom as the resolution grows", "", f"`{r['command']}`", "",
             f"{r['model']}, checkpoint `{r['checkpoint']}` ({r['weights']} weights), the same "
             f"{r['sizes'][0]['images']} images from `{r['data']}` at every size (the eval transform of that size; "
             f"smaller images are upsampled). Host: {host_line(r['host'])}.", "",
             f"A choice is **safe** at a size when its smallest headroom (65504 / the largest intermediate an fp16 "
             f"graph would hold) is at least {crit['min_headroom']:g}x, its top-1 agreement with the fp32 model is "
             f"at least {crit['min_top1_agreement']:g}% and no image gives a non-finite logit.", "",
             "## Largest safe resolution", "",
             markdown_table(["fp16 choice", "safe up to"],
                            [[SWEEP_CHOICE_TEXT[c], f"{s} px" if s else f"not at {r['sizes'][0]['img_size']} px"]
                             for c, s in r["largest_safe"].items()]), "",
             "## Per size", ""]
    rows = []
    for s in r["sizes"]:
        by = {row["variant"]: row for row in s["rows"]}
        for c in SWEEP_CHOICES:
            row = by.get(SWEEP_CHOICE_TEXT[c])
            if row is None:
                continue
            h = s["min_headroom"].get(c)
            rows.append([s["img_size"], s["tokens"]["attention1"], SWEEP_CHOICE_TEXT[c], h, row["top1_agreement"],
                         row["max_abs_dlogit"], row["nonfinite_images"], "yes" if s["safe"][c] else "**NO**"])
    lines += [markdown_table(["img px", "tokens (attention1)", "fp16 choice", "min headroom", "top-1 agreement %",
                              "max abs dlogit", "non-finite images", "safe"], rows), ""]
    perf_rows = [[s["img_size"], p["module"], p["tokens"], p["worst"], p["max"][p["worst"]], p["fp16_headroom"],
                  p["max"]["D"], p["max"]["eps"], p["exp_k_underflow"], max(p["authors_max"].values()),
                  p["authors_fp16_headroom"]]
                 for s in r["sizes"] for p in s["performers"]]
    if perf_rows:
        lines += ["## Performer cores", "",
                  "The max-shifted core (t2t_vit.layers.TokenPerformer) keeps the exp features <= 1 and D <= m at any "
                  "token count; the columns on the right are the authors' unshifted formula, whose normaliser sums "
                  "exp features over every token, for comparison. `exp(k) < 2^-24`: the fraction of k features that "
                  "fp16 flushes to zero.", "",
                  markdown_table(["img px", "core", "tokens", "largest intermediate", "its max abs", "headroom",
                                  "max D", "max eps", "exp(k) < 2^-24", "authors' formula: max", "its headroom"],
                                 perf_rows), ""]
    ln_rows = [[s["img_size"], x["module"], x["max_abs_dev"], x["max_sum_sq"], x["fp16_headroom"]]
               for s in r["sizes"] for x in sorted(s["layernorms"], key=lambda x: x["fp16_headroom"])[:3]]
    lines += ["## LayerNorms with the least headroom (three per size; the JSON has every one)", "",
              markdown_table(["img px", "LayerNorm", "max abs (x - mean)", "max sum of squares", "fp16 headroom"],
                             ln_rows), "", f"![headroom](precision-sweep-{r['model']}.png)", ""]
    return "\n".join(lines)


def _sweep_figure(r: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    tokens = [s["tokens"]["attention1"] for s in r["sizes"]]
    ax[0].loglog(tokens, [s["min_headroom"]["fp16_layernorm"] for s in r["sizes"]], marker="o",
                 label="LayerNorm (smallest)")
    if r["sizes"][0]["performers"]:
        for i, p in enumerate(r["sizes"][0]["performers"]):
            xs = [s["performers"][i]["tokens"] for s in r["sizes"]]
            ax[0].loglog(xs, [s["performers"][i]["fp16_headroom"] for s in r["sizes"]], marker="s",
                         label=f"{p['module'].split('.')[-1]} core (max-shifted)")
            ax[0].loglog(xs, [s["performers"][i]["authors_fp16_headroom"] for s in r["sizes"]], ls="--", marker=".",
                         label=f"{p['module'].split('.')[-1]}, authors' formula")
    ax[0].axhline(r["criteria"]["min_headroom"], color="#c44e52", ls=":", label="required headroom")
    ax[0].axhline(1.0, color="#c44e52", ls="--", label="overflow (65504)")
    ax[0].set_xlabel("tokens (the T2T attention's own input)")
    ax[0].set_ylabel("fp16 headroom (x)")
    ax[0].set_title("fp16 headroom against token count")
    ax[0].legend(fontsize=7)
    for c in SWEEP_CHOICES:
        pts = [(s["tokens"]["attention1"], row["top1_agreement"]) for s in r["sizes"] for row in s["rows"]
               if row["variant"] == SWEEP_CHOICE_TEXT[c]]
        if pts:
            ax[1].semilogx(*zip(*pts), marker="o", label=SWEEP_CHOICE_TEXT[c])
    ax[1].axhline(r["criteria"]["min_top1_agreement"], color="#c44e52", ls=":", label="required agreement")
    ax[1].set_xlabel("tokens of attention1 (img px: " + ", ".join(str(s["img_size"]) for s in r["sizes"]) + ")")
    ax[1].set_ylabel("top-1 agreement with fp32 (%)")
    ax[1].set_title("fp16 vs fp32 on real images")
    ax[1].legend(fontsize=7)
    for a in ax:
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
def _half(model: nn.Module) -> nn.Module:
    """The fp16 export's numerics: a half copy, the Performer core in fp32 (the model's default)."""
    import copy

    return copy.deepcopy(model).half().eval()


def _logits(model: nn.Module, batches: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(x.to(dtype)).float().numpy() for x in batches])


def _comparison_table(rows: list[dict[str, Any]], nonfinite: bool = False) -> str:
    """The Markdown table of :func:`_compare` rows (``nonfinite``: with the non-finite image count)."""
    keys = ["variant", "top1", "delta_top1", "top1_agreement", "disagreements", "max_abs_dlogit", "mean_abs_dlogit"]
    head = ["variant", "top-1 %", "delta top-1", "top-1 agreement %", "disagreements", "max abs dlogit",
            "mean abs dlogit"]
    if nonfinite:
        keys, head = keys + ["nonfinite_images"], head + ["non-finite images"]
    return markdown_table(head, [[r[k] for k in keys] for r in rows])


def _compare(name: str, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    r, c = LogitStats(), LogitStats()
    r.update(ref, labels)
    c.update(cand, labels, ref)
    s = c.summary(r)
    return {"variant": name, **{k: s[k] for k in ("top1", "delta_top1", "top1_agreement", "disagreements",
                                                  "max_abs_dlogit", "mean_abs_dlogit", "nonfinite_images")}}


def _load(args: argparse.Namespace) -> tuple[nn.Module, list[torch.Tensor], np.ndarray, str]:
    # The exported forms (one-hot Conv soft splits, explicit MatMul attention): the ops TensorRT runs.
    model = apply_export_patterns(build_model(args.model, args.checkpoint, img_size=args.img_size,
                                              weights=args.weights))
    samples, root = _samples(args, model)
    xs, labels = _batches(samples, model, args)
    return model, xs, labels, root


def _samples(args: argparse.Namespace, model: nn.Module) -> tuple[list[Any], str]:
    """The labelled images of ``--data`` (class-balanced ``--limit``), in the model's label space."""
    root = Path(args.data) if args.data else ((imagenette_root() or Path("(none)")) / "val")
    if (root / "val").is_dir():
        root = root / "val"
    if not root.is_dir():
        raise T2TError(f"no image folder: pass DATA=/path/to/val (--data); {root} does not exist")
    folders = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    index, _ = label_space(folders, model_class_names(model), int(model.num_classes))
    samples, _ = scan_image_folder(root, index)
    if args.limit:
        samples = class_balanced_subset(samples, args.limit, seed=0, what="--limit (LIMIT=)")
    return samples, str(root)


def _batches(samples: list[Any], model: nn.Module, args: argparse.Namespace) -> tuple[list[torch.Tensor], np.ndarray]:
    """The images preprocessed by ``model``'s eval transform (at its own size: smaller images are upsampled)."""
    batcher = ImageBatcher(samples, DataConfig.from_model(model), batch_size=args.batch_size,
                           num_workers=args.workers)
    xs, ys = [], []
    for x, y, _ in batcher:
        xs.append(x)
        ys.append(y.numpy())
    if not xs:
        raise T2TError(f"no readable images among the {len(samples)} of --data")
    return xs, np.concatenate(ys)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    threads = apply_threads(args.threads)
    if args.what == ["sweep"]:
        return run_sweep(args, argv, threads)
    model, xs, labels, root = _load(args)
    header = {**report_header("evaluation.precision", argv), "model": args.model, "checkpoint": args.checkpoint,
              "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
              "weights": model.pretrained_cfg.get("weights", "random"), "data": root, "images": int(len(labels)),
              "img_size": int(model.img_size), "threads": threads}
    out = Path(args.out)
    steps = [s for s in ("tf32", "layernorm", "activations") if s in args.what]
    bar = tqdm(total=8 if "tf32" in steps else 0, desc="precision", disable=args.no_progress)
    ref = _logits(model, xs)
    half = _half(model) if {"tf32", "layernorm"} & set(steps) else None  # one fp16 copy for both steps
    written = []
    with OutputLock(out):
        if "tf32" in steps:
            rows = [_compare("fp32 (reference, no TF32)", ref, ref, labels)]
            for scope, what in (("all", "fp32 model, TF32 on every MatMul/Linear/Conv"),
                                ("performer", "fp32 model, TF32 in the Performer island only")):
                with tf32_matmuls(scope):
                    rows.append(_compare(what, ref, _logits(model, xs), labels))
                bar.update(1)
            half16 = _logits(half, xs, torch.float16)
            rows.append(_compare("fp16 model, fp32 island (the fp16 engine without TF32)", ref, half16, labels))
            with tf32_matmuls("performer"):
                rows.append(_compare("fp16 model, TF32 island (the fp16 engine with TF32 on)", ref,
                                     _logits(half, xs, torch.float16), labels))
            bar.update(2)
            tf32 = {**header, "rows": rows}
            md = ["# TF32 in the TensorRT path, emulated", "", f"`{tf32['command']}`", "",
                  f"{args.model}, checkpoint `{args.checkpoint}` ({header['weights']} weights), {len(labels)} images "
                  f"from `{root}`; against the fp32 model with plain fp32 arithmetic. TF32 = MatMul/Linear/Conv "
                  f"inputs rounded to 10 mantissa bits (round to nearest even), fp32 accumulation. Host: "
                  f"{host_line(header['host'])}.", "",
                  _comparison_table(rows), ""]
            written += write_report(out / f"precision-tf32-{args.model}", tf32, "\n".join(md))
        if "layernorm" in steps:
            stats = layernorm_stats(model, xs)
            rows = []
            for mode in ("fp32", "fp16-io", "fp16-math"):
                with layernorm_mode(mode):
                    rows.append(_compare(f"fp16 model, LayerNorm {mode}", ref, _logits(half, xs, torch.float16),
                                         labels))
                bar.update(1)
            ln = {**header, "layernorms": stats, "rows": rows,
                  "min_fp16_headroom": min(s["fp16_headroom"] for s in stats)}
            worst = min(stats, key=lambda s: s["fp16_headroom"])
            md = ["# LayerNorm in fp16 (TensorRT strong typing computes it in its input type)", "",
                  f"`{ln['command']}`", "",
                  f"{args.model}, checkpoint `{args.checkpoint}` ({header['weights']} weights), {len(labels)} images "
                  f"from `{root}`. Host: {host_line(header['host'])}.", "",
                  "## Effect on the fp16 model", "",
                  "fp16 model = the fp16 export's numerics (`.half()`, Performer island in fp32), LayerNorm computed "
                  "as stated; compared with the fp32 model. `fp16-io`: fp16 input/output, fp32 mean/variance. "
                  "`fp16-math`: mean, squares and sums in fp16 (pairwise), the worst case.", "",
                  _comparison_table(rows, nonfinite=True), "",
                  "## Per LayerNorm", "",
                  f"fp16 overflows when a square (|x - mean| > 256) or a sum of squares passes {FP16_MAX:g}. "
                  f"Headroom = how many times larger the worst value could grow first. Smallest headroom: "
                  f"**{worst['fp16_headroom']:.3g}x** at `{worst['module']}`.", "",
                  markdown_table(["LayerNorm", "width", "max abs x", "max abs (x - mean)", "max variance",
                                  "max sum of squares", "fp16 headroom"],
                                 [[s["module"], s["width"], s["max_abs_x"], s["max_abs_dev"], s["max_var"],
                                   s["max_sum_sq"], s["fp16_headroom"]] for s in stats]), ""]
            written += write_report(out / f"precision-layernorm-{args.model}", ln, "\n".join(md), _ln_figure(stats))
        if "activations" in steps:
            acts = activation_stats(model, xs)
            rep = {**header, "activations": acts}
            md = ["# Activation statistics (what INT8 ranges and fp16 see)", "", f"`{rep['command']}`", "",
                  f"{args.model}, checkpoint `{args.checkpoint}`, {len(labels)} images from `{root}`. Per LayerNorm "
                  f"input and per Linear (MatMul) input: max |x|, the 99.99th percentile of |x| (estimated from a "
                  f"uniform sample of 20,000 values per batch), their ratio (how far the outliers sit beyond the "
                  f"bulk: per-tensor int8 scales are set by them), and the largest channels (max |x| over tokens and "
                  f"images, and how many times the median channel's). Host: {host_line(header['host'])}.", "",
                  markdown_table(["module", "input of", "channels", "max abs", "p99.99 abs", "max / p99.99",
                                  "largest channels (x median)"],
                                 [[a["module"], a["kind"], a["channels"], a["max_abs"], a["p9999_abs"],
                                   a["max_over_p9999"],
                                   ", ".join(f"{c['channel']} ({c['x_median_channel']:.1f}x)" for c in a["top_channels"][:3])]
                                  for a in acts]), ""]
            written += write_report(out / f"activations-{args.model}", rep, "\n".join(md), _act_figure(acts))
    bar.close()
    return {"written": [str(p) for p in written]}


def _ln_figure(stats: list[dict[str, Any]]) -> Any:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(stats))
    ax.semilogy(x, [s["max_abs_dev"] for s in stats], marker="o", label="max |x - mean|")
    ax.semilogy(x, [s["max_sum_sq"] for s in stats], marker="s", label="max sum of squares")
    ax.axhline(256, color="#c44e52", ls=":", label="|x - mean| = 256 (square overflows fp16)")
    ax.axhline(FP16_MAX, color="#c44e52", ls="--", label="65504 (fp16 max)")
    ax.set_xticks(x, [s["module"] for s in stats], rotation=70, ha="right", fontsize=7)
    ax.set_title("LayerNorm inputs against fp16's limits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _act_figure(acts: list[dict[str, Any]]) -> Any:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(acts))
    ax.semilogy(x, [a["max_abs"] for a in acts], marker=".", label="max |x|")
    ax.semilogy(x, [a["p9999_abs"] for a in acts], marker=".", label="99.99th percentile |x|")
    ax.set_xticks(x, [a["module"] for a in acts], rotation=80, ha="right", fontsize=6)
    ax.set_title("LayerNorm and Linear inputs by depth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TF32, fp16 LayerNorm and activation statistics of a checkpoint, "
                                            "emulated with PyTorch on a CPU", add_help=add_help)
    add_stage_args(p, out_help="report folder (default reports)")
    add_run_args(p, batch_size=64, workers=2)
    g = p.add_argument_group("evidence")
    g.add_argument("--data", default=None, help="labelled ImageFolder (default: the development data's Imagenette val)")
    add_limit_arg(g)
    g.add_argument("--what", default="tf32,layernorm,activations",
                   help="which reports, comma-separated: tf32, layernorm, activations (default all), or sweep alone")
    g = p.add_argument_group("resolution sweep (--what sweep, or --sweep alone)")
    g.add_argument("--sweep", type=comma_list(int), default=None,
                   help=f"input sizes, comma-separated, e.g. 80,160,224,384: the same weights at each size -> "
                        f"precision-sweep-<model>.{{json,md,png}} (default --limit there: {SWEEP_DEFAULT_LIMIT} images)")
    g.add_argument("--min-headroom", type=float, default=2.0,
                   help="headroom a choice needs to count as safe at a size (default 2.0x)")
    g.add_argument("--min-agreement", type=float, default=99.0,
                   help="top-1 agreement with fp32 (%%) a choice needs to count as safe at a size (default 99)")
    return p


def _check_sweep(args: argparse.Namespace) -> None:
    """Resolve --what/--sweep into one of the two modes; raise with the fix when they disagree."""
    if args.sweep and "sweep" not in args.what:
        args.what = ["sweep"] if args.what == DEFAULT_WHAT else args.what + ["sweep"]
    if "sweep" in args.what:
        if args.what != ["sweep"]:
            raise T2TError(f"--what sweep runs on its own; got --what {','.join(args.what)} (run the sweep and the "
                           f"other reports as two commands)")
        if not args.sweep:
            raise T2TError("--what sweep needs the sizes: --sweep 80,160,224,384 (make precision-sweep SWEEP=...)")
        bad = [n for n in args.sweep if n <= 0 or n % 16]
        if bad:
            raise T2TError(f"--sweep sizes must be positive multiples of 16 (the T2T stage downsamples by 16), got {bad}")
        args.sweep = sorted(set(args.sweep))
        if args.limit is None:
            args.limit = SWEEP_DEFAULT_LIMIT


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.out is None:
        args.out = "reports"
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in args.what if w not in ("tf32", "layernorm", "activations", "sweep")]

    def body() -> int:
        if bad:
            raise T2TError(f"--what takes tf32, layernorm, activations, or sweep alone; got {bad}")
        _check_sweep(args)
        res = run(args, argv)
        print("wrote " + ", ".join(res["written"]))
        return 0

    return run_command(body, "evaluation.precision")


if __name__ == "__main__":
    raise SystemExit(main())
