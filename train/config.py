"""Training configuration: argparse flags, per-model YAML recipes, and the resolved config.

Precedence (lowest first): flag defaults < the recipe YAML (``--config``, else
``train/configs/<model>.yaml``) < the resumed checkpoint's config (``--resume``) < flags given on the
command line. Every key of a YAML file is a flag's ``dest`` (``batch_size`` for ``--batch-size``).

Learning rate and batch size: ``batch_size`` is per process; the global batch is ``batch_size x
world_size``. The authors' recipes give ``lr`` for a global batch of 512 (8 GPUs x 64) and use no
scaling rule; ``--lr-scale linear`` multiplies ``lr`` by ``global_batch / lr_base_batch`` (512).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from t2t_vit.checkpoint import checkpoint_meta, read_checkpoint
from t2t_vit.cli import add_limit_arg
from t2t_vit.errors import T2TError
from t2t_vit.model import check_img_size

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

__all__ = ["ConfigError", "recipe_summary", "get_args_parser", "parse_config", "recipe_path", "resolve_lr", "resolve_schedule", "resolve_ema_decay",
           "CONFIG_DIR"]


class ConfigError(T2TError, ValueError):
    """A recipe file or flag value that cannot be used; the message names it."""


def _float_pair(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a T2T-ViT (authors' recipe by default; YAML recipe + command-line overrides)",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="recipe YAML (default: train/configs/<model>.yaml)")
    g.add_argument("--model", default="t2t_vit_12", help="registered model name")
    g.add_argument("--data", default=None, help="dataset root holding train/ and val/ in ImageFolder layout")
    g.add_argument("--out", default=None, help="run folder (default runs/<model>)")
    g.add_argument("--resume", default=None, help="continue a run exactly from its checkpoint (last.pth)")
    g.add_argument("--finetune", default=None, help="initialise from a checkpoint (head dropped if the class count differs)")
    g.add_argument("--num-classes", type=int, default=None, help="head size (default: number of class folders)")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the model's registry size)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on GPUs that support it, fp16 + GradScaler on older GPUs, fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--workers", type=int, default=4, help="data loader processes per rank")
    g.add_argument("--threads", default="auto",
                   help="torch intra-op threads per process: a number, or auto = the cores idle at start (shared among "
                        "this node's processes). On a busy CPU, OpenMP threads that outnumber the free cores spin "
                        "against each other and training slows several-fold")
    add_limit_arg(g, "--limit-train", variable=None, what="train images (quick runs)")
    add_limit_arg(g, "--limit-val", variable=None, what="val images")
    g.add_argument("--cache-images", type=int, default=0,
                   help="decode every image once and keep it in memory downsized to N px (0 = off). For CPU runs at "
                        "reduced resolution, where JPEG decoding dominates; val is cached already eval-transformed")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also keep epoch_<N>.pth every N epochs (0 = off)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and always on the last)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop this invocation after N more epochs (the schedule still spans all epochs; --resume continues)")
    g.add_argument("--max-nonfinite", type=int, default=20,
                   help="stop after this many non-finite losses in a row (each one skips its step)")

    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=int, default=310,
                   help="total epochs of the run: warmup, cosine and cooldown all fit inside (warmup and cooldown "
                        "shrink, with a warning, when they take more than half of a short run)")
    g.add_argument("--cooldown-epochs", type=int, default=10, help="last epochs at min-lr, inside --epochs")
    g.add_argument("--warmup-epochs", type=int, default=10, help="first epochs, linear from warmup-lr, inside --epochs")
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--lr", type=float, default=1e-3, help="peak lr for a global batch of --lr-base-batch")
    g.add_argument("--lr-scale", default="none", choices=["none", "linear"],
                   help="linear: lr x global_batch / lr-base-batch")
    g.add_argument("--lr-base-batch", type=int, default=512, help="global batch the recipe's lr was tuned for")
    g.add_argument("--batch-size", type=int, default=64, help="per-process batch (global = batch-size x processes)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--opt-betas", type=_float_pair, default=[0.9, 0.999], help="comma-separated")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None)

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment spec ('' = none)")
    g.add_argument("--color-jitter", type=float, default=0.4, help="used only without --aa (timm)")
    g.add_argument("--scale", type=_float_pair, default=[0.08, 1.0], help="random-resized-crop area range")
    g.add_argument("--ratio", type=_float_pair, default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--model-ema-decay", type=float, default=0.99996,
                   help="the longest EMA memory; capped so the EMA's time constant 1/(1-decay) stays within "
                        "1/10 of the run's updates (a short run's EMA would otherwise stay at initialization)")
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="ramp the EMA decay up from 0 over the first updates (timm ModelEmaV3 warmup)")
    return p


def recipe_summary(args: argparse.Namespace) -> str:
    """The recipe values that decide a run, in one line (what a user should check when no recipe file applied)."""
    return (f"epochs {args.epochs} (warmup {args.warmup_epochs}, cooldown {args.cooldown_epochs}), lr {args.lr}, "
            f"batch {args.batch_size}, weight decay {args.weight_decay}, aa {args.aa!r}, mixup {args.mixup}, "
            f"cutmix {args.cutmix}, drop path {args.drop_path}, EMA {args.model_ema_decay}")


def recipe_path(model: str) -> Path:
    return CONFIG_DIR / f"{model}.yaml"


def load_yaml(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (recipes live in {CONFIG_DIR})")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; keys are flag names with '_' for '-' "
                         f"(see python -m train.train --help)")
    return data


def parse_config(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse flags over the recipe; returns the namespace and where the defaults came from.

    Without ``--resume``, a run folder that already holds this command's ``last.pth`` (an interrupted or
    finished run) is resumed, so re-running the command never starts over on top of its checkpoints;
    a ``last.pth`` of another run (other model or recipe), or a ``best.pth`` without one, is refused.
    """
    args, sources = _parse(argv, resume=None)
    if sources.get("resume"):
        return args, sources
    last = Path(args.out) / "last.pth"
    if not last.is_file():
        if (Path(args.out) / "best.pth").is_file():
            raise ConfigError(f"{args.out} holds best.pth but no last.pth to resume from, and a new run would "
                              f"overwrite it: train in a fresh folder (--out DIR, make RUN_DIR=DIR) or move best.pth away")
        return args, sources
    ckpt = read_checkpoint(last)
    differences = _rerun_differences(args, ckpt, last)
    if differences:
        raise ConfigError(
            f"{args.out} already holds last.pth of another run ({'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}): continue that run with --resume {last} (its own settings), "
            f"or start this one in a fresh folder (--out DIR, make RUN_DIR=DIR)")
    args, sources = _parse(argv, resume=last)
    total = int(dict(checkpoint_meta(ckpt).get("config") or {}).get("total_epochs") or args.epochs)
    sources["rerun"] = (f"{args.out} already holds this run's last.pth (epoch {int(ckpt['epoch']) + 1} of {total}): "
                        f"resuming it; to start over, train in a fresh folder (--out DIR, make RUN_DIR=DIR)")
    return args, sources


# Flags that do not change what a run computes (or are per invocation): a re-run may differ in them.
_RERUN_FREE = {"resume", "stop_after", "finetune", "config", "out", "workers", "threads", "device", "compile",
               "checkpoint_every", "eval_every", "max_nonfinite", "cache_images"}


def _rerun_differences(args: argparse.Namespace, ckpt: Any, last: Path) -> list[str]:
    """How this command's settings differ from those of the run that wrote ``last`` ("key A there, B here")."""
    meta = checkpoint_meta(ckpt)
    stored = dict(meta.get("config") or {})
    if not stored or "epoch" not in ckpt:
        return [f"{last} was not written by train.train"]
    out = []
    if meta.get("model") != args.model:
        out.append(f"model {meta.get('model')} there, {args.model} here")
    for key, value in sorted(vars(args).items()):
        if key in _RERUN_FREE or key == "model" or value is None or key not in stored:
            continue  # None: not set here, the run's own value applies
        there, here = stored[key], _plain(value)
        if key == "data" and there is not None:
            there, here = str(Path(str(there)).resolve()), str(Path(str(value)).resolve())
        if there != here:
            out.append(f"{key} {there} there, {here} here")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _parse(argv: Sequence[str] | None, resume: Path | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Flags over the recipe, or over the config of ``--resume`` (or ``resume``: the run folder's last.pth)."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if resume is not None:
        pre.resume = str(resume)
    sources: dict[str, Any] = {}
    base: dict[str, Any] = {}
    if pre.resume:
        meta = checkpoint_meta(read_checkpoint(pre.resume))
        base = dict(meta.get("config") or {})
        if base.get("total_epochs") and base.get("epochs") != base["total_epochs"]:
            # Written when --epochs counted cosine epochs only (cooldown added on top): keep the run's length.
            base["epochs"] = base["total_epochs"]
        # Per-invocation controls are never inherited from the interrupted run.
        for k in ("resume", "stop_after", "finetune", "config"):
            base.pop(k, None)
        sources["resume"] = str(pre.resume)
        # Where a fine-tune started stays recorded in every later invocation's config.
        started = base.get("sources") or {}
        sources.update({k: started[k] for k in ("finetune", "finetune_sha256") if started.get(k)})
    else:
        cfg_file = pre.config
        if cfg_file is None:
            model = pre.model
            # --model may be absent from argv when the YAML names it; then the default model's recipe applies.
            cfg_file = recipe_path(model) if recipe_path(model).is_file() else None
        if cfg_file is not None:
            base = load_yaml(cfg_file, parser)
            sources["config"] = str(cfg_file)
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in base.items() if k in known})
    args = parser.parse_args(argv)
    if resume is not None:
        args.resume = str(resume)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is None or getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)} "
                             f"(make train EPOCHS=... / BATCH_SIZE=...)")
    if args.img_size is not None:
        check_img_size(args.img_size, "--img-size (make train IMG_SIZE=)")
    for flag in ("warmup_epochs", "cooldown_epochs"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.out is None:
        args.out = str(Path(pre.resume).parent) if pre.resume else os.path.join("runs", args.model)
    return args, sources


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """Peak lr after the optional linear scaling rule (the recipe's lr is for lr_base_batch)."""
    if args.lr_scale == "linear":
        return args.lr * args.batch_size * world_size / args.lr_base_batch
    return args.lr


def resolve_schedule(epochs: int, warmup: int, cooldown: int) -> tuple[int, int, str | None]:
    """(warmup, cooldown) that fit inside a run of ``epochs`` total epochs, and a warning when they shrank.

    Warmup and cooldown together may take at most half of the run; beyond that both shrink in
    proportion (a 1-epoch run gets neither and trains its one epoch at the peak lr).
    """
    budget = epochs // 2
    if warmup + cooldown <= budget:
        return warmup, cooldown, None
    new_warmup = (warmup * budget) // (warmup + cooldown)
    new_cooldown = budget - new_warmup
    return new_warmup, new_cooldown, (
        f"--epochs {epochs} cannot hold --warmup-epochs {warmup} + --cooldown-epochs {cooldown} (they may take at "
        f"most half of the run): using warmup {new_warmup} and cooldown {new_cooldown}, "
        f"so {epochs - new_warmup - new_cooldown} epochs follow the cosine")


def resolve_ema_decay(decay: float, total_updates: int, fraction: float = 0.1) -> tuple[float, str | None]:
    """EMA decay whose time constant 1/(1-decay) is at most ``fraction`` of the run's optimizer updates.

    The authors' 0.99996 (a time constant of 25,000 updates) suits ImageNet's 775,000; a 10-epoch run on a
    small dataset has ~1,500 updates, and with that decay its EMA weights would still be the random
    initialization at the end. Returns the decay used and a note when it was capped.
    """
    if total_updates <= 0:
        return decay, None
    cap = 1.0 - 1.0 / max(fraction * total_updates, 1.0)
    if decay <= cap:
        return decay, None
    return cap, (f"--model-ema-decay {decay:g} averages over {1 / (1 - decay):,.0f} updates, more than "
                 f"{fraction:.0%} of this run's {total_updates:,}: using {cap:.6g} (averages over "
                 f"{1 / (1 - cap):,.0f} updates, {fraction:.0%} of the run)")
