"""Train a T2T-ViT: the authors' recipe on timm's training utilities, one process or many (torchrun/DDP).

    python -m train.train --model t2t_vit_7 --data /data/imagenet            # recipe train/configs/t2t_vit_7.yaml
    torchrun --nproc_per_node 8 -m train.train --model t2t_vit_12 --data /data/imagenet
    python -m train.train --config train/configs/imagenette_cpu.yaml --data ../shared/data/imagenette2
    python -m train.train --resume runs/t2t_vit_7/last.pth                   # continues exactly

Re-running a command whose run folder holds its last.pth resumes it (an interrupted run continues, a finished
one has nothing left to do); another run's last.pth there, or a best.pth without one, is refused.

The run folder (``--out``, default ``runs/<model>``) receives ``config.yaml`` (resolved),
``last.pth``, ``best.pth`` (best top-1 of the EMA or the raw weights, whichever is higher; the checkpoint's
``weights`` key says which, and later stages load those by default), ``epoch_<N>.pth`` (``--checkpoint-every``),
``summary.csv`` (one row per epoch), ``curves.png`` and ``log.txt``. Only rank 0 writes.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import yaml
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn
from tqdm import tqdm

import t2t_vit
from t2t_vit.checkpoint import load_checkpoint, read_checkpoint
from t2t_vit.cli import fit_workers, resolve_threads, run_command
from t2t_vit.data import DataConfig, DataError, ImageBatcher, SkippingDataset, skip_collate
from t2t_vit.errors import T2TError
from t2t_vit.files import OutputLock, atomic_torch_save, atomic_write, atomic_write_text, file_sha256
from t2t_vit.metrics import topk_correct
from t2t_vit.reports import pyplot

from .config import parse_config, recipe_path, recipe_summary, resolve_ema_decay, resolve_lr, resolve_schedule
from .data import ImageCache, build_train_transform, resolve_split, scan_split, seed_worker

_logger = logging.getLogger("train")
# The run folder is RUN_DIR in make train (OUT names the artifact folder of the other stages).
RUN_DIR_HINT = "RUN_DIR=... / --out"

CSV_FIELDS = ["epoch", "lr", "train_loss", "top1", "top5", "ema_top1", "ema_top5", "best_weights", "img_per_s",
              "peak_mem_mib", "epoch_s", "wall_s", "nonfinite_steps", "skipped_images"]


class NonFiniteLossError(T2TError, RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------- setup

def init_distributed(device_arg: str | None) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but PyTorch sees no CUDA GPU; use --device cpu")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return rank, local_rank, world, device


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed), decided once per run."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[precision]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every epoch reseeds all RNGs from (seed, epoch, rank): an epoch's randomness (augmentation,
    mixup, drop path, worker seeds) then depends only on where it starts, which makes --resume exact
    without pickling numpy/python RNG states into the checkpoint."""
    return seed + 10007 * (epoch + 1) + 101 * rank


_HANDLERS: list[logging.Handler] = []


def setup_logging(rank: int, out: Path | None) -> None:
    """Console (and rank 0's log.txt) handlers on the root logger; replaces only the ones added here
    before, so repeated in-process runs (tests) neither duplicate lines nor drop other handlers."""
    root = logging.getLogger()
    for h in _HANDLERS:
        root.removeHandler(h)
        h.close()
    _HANDLERS.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    _HANDLERS.append(logging.StreamHandler(sys.stderr))
    if out is not None and rank == 0:
        _HANDLERS.append(logging.FileHandler(out / "log.txt"))
    for h in _HANDLERS:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _die_with_launcher() -> None:
    """Under torchrun: ask the kernel to kill this worker if the launcher dies (even by SIGKILL), so a stopped
    launcher never leaves workers training on under PID 1. SIGKILL, not SIGTERM: a worker waiting in a
    collective for a peer cannot run a Python handler, and nothing is lost (checkpoints are written atomically).
    A launcher that is only asked to stop forwards the signal to its workers itself."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def teardown_logging() -> None:
    """Remove (and close) the handlers :func:`setup_logging` added, so nothing logs into a finished run."""
    root = logging.getLogger()
    for h in _HANDLERS:
        root.removeHandler(h)
        h.close()
    _HANDLERS.clear()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ------------------------------------------------------------------------------------------------- I/O

def plain(value: Any) -> Any:
    """The config as plain data (loads with weights_only=True, dumps to YAML)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def learning_curves(rows: list[dict[str, Any]], title: str) -> Any:
    """The figure of a run: train loss, val top-1 (raw and EMA weights) and top-5, lr, by epoch.

    ``rows`` are summary.csv rows (strings) or parsed ones; epochs without validation are skipped in the
    accuracy lines, so ``--eval-every N`` still draws connected curves.
    """
    plt = pyplot()

    def col(name: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].plot(*col("train_loss"), marker=".")
    ax[0].set_title("train loss")
    for name, label, style in (("top1", "raw weights top-1", "-"), ("ema_top1", "EMA top-1", "-"),
                               ("top5", "raw weights top-5", "--")):
        xs, ys = col(name)
        if xs:
            ax[1].plot(xs, ys, style, marker=".", label=label)
    ax[1].set_title("val accuracy (%)")
    ax[1].legend()
    ax[2].plot(*col("lr"), marker=".")
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Write :func:`learning_curves` to ``path`` (PNG, atomically)."""
    import matplotlib.pyplot as plt

    fig = learning_curves(rows, title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------------------- train / eval

def build_criterion(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup/cutmix already folded label smoothing into the targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
             world: int) -> dict[str, float]:
    """Top-1/top-5 (%) over this rank's shard, summed across ranks (exact: shards do not overlap)."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)  # correct1, correct5, count
    for batch in loader:
        x, y = batch[0], batch[1]
        if x is None:
            continue
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = model(x.to(device, non_blocking=True))
        logits, labels = logits.float().cpu().numpy(), y.numpy()
        stats += torch.tensor([topk_correct(logits, labels, 1).sum(), topk_correct(logits, labels, 5).sum(),
                               len(labels)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)
    n = max(stats[2].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n, "count": int(stats[2].item())}


def _log_to_file(message: str) -> None:
    """Record an error in the run's log.txt only (the console line comes from run_command, once)."""
    record = logging.LogRecord("train", logging.ERROR, __file__, 0, message, None, None)
    for h in _HANDLERS:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get("LOCAL_RANK") is not None and sys.platform.startswith("linux"):
        _die_with_launcher()  # first thing: the launcher may be stopped while this worker starts up

    def body() -> int:
        args, sources = parse_config(argv)
        try:
            return run(args, sources)
        except T2TError as e:
            _log_to_file(f"error: {e}")
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            teardown_logging()

    return run_command(body, "train.train", out_hint=RUN_DIR_HINT)


def run(args: argparse.Namespace, sources: dict[str, Any]) -> int:
    """Check the inputs, then take the run folder (refused while another run writes it) and train."""
    with contextlib.ExitStack() as stack:
        return _run(args, sources, stack)


def _threads(spec: Any, world: int) -> int:
    """Intra-op threads per process: ``auto`` shares the idle cores among this node's processes."""
    n = resolve_threads(spec)
    if world > 1 and str(spec or "auto").lower() == "auto":
        n = max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return n


# ----------------------------------------------------------------------------------------- the run
# _run reads as the run does: plan (check the inputs, settle the process), build (data, model, optimizer,
# resume), then epoch by epoch train, validate and commit (summary.csv -> best.pth -> last.pth), then report.
# The order of the steps is the order of the random draws: changing it changes the weights a seed gives.

@dataclass(frozen=True)
class RunPlan:
    """Where and how this process trains, settled before anything is built or written."""
    rank: int
    local_rank: int
    world: int
    device: torch.device
    out: Path
    amp_dtype: torch.dtype | None
    use_scaler: bool


@dataclass(frozen=True)
class _Data:
    """The scanned split: samples of train and val on one class index (train's folders)."""
    train_dir: Path
    val_dir: Path
    train_samples: list
    val_samples: list
    class_names: list[str]


@dataclass(frozen=True)
class _Schedule:
    """The resolved learning rate, epochs and EMA decay (recorded in config.yaml)."""
    lr: float
    total_epochs: int
    warmup_epochs: int
    cooldown_epochs: int
    ema_decay: float


@dataclass
class _Trainer:
    """What the epochs act on; ``train_model`` is ``model`` compiled and/or wrapped in DDP."""
    model: nn.Module
    optimizer: Any
    scheduler: CosineLRScheduler
    scaler: NativeScaler | None
    ema: ModelEmaV3 | None
    criterion: nn.Module
    mixup_fn: Mixup | None
    sampler: torch.utils.data.DistributedSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_images: int
    val_images: int
    train_model: nn.Module | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    """The counters a checkpoint carries, so that a resume continues where the run stopped."""
    best: dict[str, Any]  # the better of the EMA and the raw weights at each validation ("weights" says which)
    preferred: str  # the better weights at the latest validation, recorded in every checkpoint
    start_epoch: int = 0
    num_updates: int = 0
    nonfinite_total: int = 0
    consecutive_bad: int = 0


@dataclass(frozen=True)
class _Epoch:
    """One finished epoch: its summary.csv row and what the log line reports."""
    index: int  # 0-based, as the checkpoint's "epoch" key
    row: dict[str, Any]
    train_loss: float
    seconds: float
    is_best: bool


def _run(args: argparse.Namespace, sources: dict[str, Any], stack: contextlib.ExitStack) -> int:
    plan = _plan(args, sources)
    data, resume_obj = _read_inputs(args)
    model, data_config = _build_model(args, sources, data)
    if plan.rank == 0:
        stack.enter_context(OutputLock(plan.out, f"train.train (pid {os.getpid()})", out_hint=RUN_DIR_HINT))
        setup_logging(plan.rank, plan.out)
    trainer, schedule = _build_trainer(args, plan, model, data, data_config)
    progress = _restore(args, trainer, resume_obj)
    del resume_obj
    trainer.train_model = _wrap_for_training(args, plan, model)
    trainer.meta = _record_config(args, sources, plan, data, data_config, schedule, trainer)

    # Epochs are numbered from 1 for people (CSV, plot, log, progress bar, epoch_<N>.pth); the checkpoint's
    # "epoch" key is the 0-based index of the last finished epoch.
    rows = ([r for r in read_csv(plan.out / "summary.csv") if int(r["epoch"]) <= progress.start_epoch]
            if plan.rank == 0 else [])
    wall0 = time.time() - (float(rows[-1]["wall_s"]) if rows else 0.0)
    total_epochs = schedule.total_epochs
    stop_epoch = total_epochs if args.stop_after is None else min(total_epochs, progress.start_epoch + args.stop_after)
    for epoch in range(progress.start_epoch, stop_epoch):
        row, train_loss, epoch_s = _train_epoch(args, plan, trainer, progress, epoch, total_epochs)
        last_epoch = epoch == total_epochs - 1 or epoch == stop_epoch - 1
        is_best = False
        if (epoch + 1) % max(args.eval_every, 1) == 0 or last_epoch:
            is_best = _validate_epoch(plan, trainer, progress, row, epoch)
        row["wall_s"] = round(time.time() - wall0, 1)
        if plan.rank == 0:
            _commit_epoch(args, plan, trainer, progress, rows, _Epoch(epoch, row, train_loss, epoch_s, is_best))
    if plan.rank == 0:
        best = progress.best
        _logger.info("done: best top-1 %.2f (%s weights) at epoch %d; checkpoints in %s", best["top1"],
                     "EMA" if best.get("weights") == "ema" else "raw", best["epoch"] + 1, plan.out)
    return 0


def _plan(args: argparse.Namespace, sources: dict[str, Any]) -> RunPlan:
    """Settle the process (rank, device, precision, threads, seed) and refuse bad flags before any file is read."""
    rank, local_rank, world, device = init_distributed(args.device)
    setup_logging(rank, None)  # console only: the run folder is made once the inputs are known to be good
    if sources.get("rerun") and rank == 0:
        _logger.warning("%s", sources["rerun"])
    if args.data is None:
        raise DataError("no dataset: pass --data DIR (DIR/train and DIR/val in ImageFolder layout) or DATA=DIR to make")
    if args.model not in t2t_vit.ARCHS:
        raise T2TError(f"unknown model {args.model!r}; registered: {', '.join(t2t_vit.ARCHS)}")
    if not sources.get("config") and not sources.get("resume") and rank == 0:
        _logger.warning("no recipe for %s (%s): using the flag defaults (%s); pass --config or the flags you "
                        "want", args.model, recipe_path(args.model), recipe_summary(args))
    amp_dtype, use_scaler = resolve_precision(args.precision, device)
    args.threads_resolved = _threads(args.threads, world)
    torch.set_num_threads(args.threads_resolved)
    seed_all(args.seed)  # model init (and the Performer's fixed random features) depend on it
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return RunPlan(rank, local_rank, world, device, Path(args.out), amp_dtype, use_scaler)


def _read_inputs(args: argparse.Namespace) -> tuple[_Data, dict[str, Any] | None]:
    """The split folders, the checkpoint to resume (if any) and the samples; val is mapped onto train's classes."""
    train_dir, val_dir = resolve_split(args.data, "train"), resolve_split(args.data, "val")
    resume_obj = read_checkpoint(args.resume) if args.resume else None
    train_samples, class_names = scan_split(train_dir, None, args.limit_train, args.seed)
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    val_samples, _ = scan_split(val_dir, class_to_idx, args.limit_val, args.seed)
    num_classes = args.num_classes or len(class_names)
    if num_classes != len(class_names):
        raise DataError(f"--num-classes {num_classes} does not match the {len(class_names)} class folders in "
                        f"{train_dir}; drop --num-classes to use the folder count, or point --data at the right dataset")
    args.num_classes = num_classes
    return _Data(train_dir, val_dir, train_samples, val_samples, class_names), resume_obj


def _build_model(args: argparse.Namespace, sources: dict[str, Any], data: _Data) -> tuple[nn.Module, DataConfig]:
    """The model (seeded by _plan), its input config and, with --finetune, the starting weights."""
    model = timm.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size,
                              drop_rate=args.drop, drop_path_rate=args.drop_path)
    args.img_size = model.img_size
    data_config = DataConfig.from_model(model)
    if args.finetune:
        report = load_checkpoint(model, args.finetune)  # drops a head of another class count
        # Provenance kept through every resume (train.config carries it over): the file may be rewritten later.
        sources.update(finetune=str(args.finetune), finetune_sha256=file_sha256(args.finetune))
        rows = report.get("pos_embed_rows")
        pos = (f"position table {'rebuilt' if report['rebuilt_pos_embed'] else 'resampled'} for {rows[1]} rows "
               f"(checkpoint: {rows[0]})") if rows else "position table kept"
        _logger.info("fine-tuning from %s (%s, %s)", args.finetune,
                     "new head" if report["dropped_head"] else "head kept", pos)
    return model, data_config


def _build_loaders(args: argparse.Namespace, plan: RunPlan, data: _Data, data_config: DataConfig):
    """(train set, val set, sampler, train loader, val loader); with --cache-images both sets sit in memory."""
    rank, world = plan.rank, plan.world
    cache = None
    if args.cache_images:
        cache = ImageCache(data.train_samples, args.cache_images, progress=rank == 0)
        if cache.skipped:
            _logger.warning("%d unreadable train images skipped while caching", cache.skipped)
    train_ds = SkippingDataset(cache.samples if cache else data.train_samples,
                               build_train_transform(args, data_config), images=cache.images if cache else None)
    if args.cache_images:
        # Val is cached after the exact eval transform, so training-time accuracy equals train.validate's.
        x, y, _ = ImageBatcher(data.val_samples, data_config, batch_size=256).tensor(progress=rank == 0)
        val_ds: torch.utils.data.Dataset = torch.utils.data.TensorDataset(x, y)
    else:
        val_ds = SkippingDataset(data.val_samples, data_config.eval_transform())
    val_shard = torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))  # disjoint shards: exact sums
    if len(train_ds) < args.batch_size * world:
        raise DataError(f"{len(train_ds)} training images are fewer than one global batch "
                        f"({args.batch_size} x {world}); lower --batch-size")
    # One sampler type for 1 and N processes: shuffles with (seed, epoch), shards by rank.
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    args.workers = fit_workers(args.workers)  # once, before torch warns at every loader it starts
    loader_kw = dict(num_workers=args.workers, pin_memory=plan.device.type == "cuda", worker_init_fn=seed_worker,
                     persistent_workers=False)  # fresh workers each epoch pick up the epoch's seed
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=True, collate_fn=skip_collate, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=args.batch_size * 2, shuffle=False,
                                             collate_fn=None if args.cache_images else skip_collate,
                                             **{**loader_kw, "num_workers": 0 if args.cache_images else args.workers})
    return train_ds, val_ds, sampler, train_loader, val_loader


def _build_trainer(args: argparse.Namespace, plan: RunPlan, model: nn.Module, data: _Data,
                   data_config: DataConfig) -> tuple[_Trainer, _Schedule]:
    """Loaders, loss, optimizer, lr schedule, loss scaler and EMA, as the recipe asks."""
    train_ds, val_ds, sampler, train_loader, val_loader = _build_loaders(args, plan, data, data_config)
    mixup_active = args.mixup > 0 or args.cutmix > 0
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=args.num_classes) if mixup_active else None
    criterion = build_criterion(args, mixup_active)

    model.to(plan.device)
    lr = resolve_lr(args, plan.world)
    # timm's factory: no weight decay on biases, 1-D params and model.no_weight_decay() ({'cls_token'});
    # frozen parameters (Performer `w`, `pos_embed`) have requires_grad=False and are left out.
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, eps=args.opt_eps, betas=tuple(args.opt_betas))
    scaler = NativeScaler(device=plan.device.type) if plan.use_scaler else None
    total_epochs = args.epochs
    warmup_epochs, cooldown_epochs, shrunk = resolve_schedule(args.epochs, args.warmup_epochs, args.cooldown_epochs)
    if shrunk and plan.rank == 0:
        _logger.warning("%s", shrunk)
    # timm's cosine runs over [0, t_initial); epochs past it stay at lr_min (the cooldown).
    scheduler = CosineLRScheduler(optimizer, t_initial=total_epochs - cooldown_epochs, lr_min=args.min_lr,
                                  warmup_t=warmup_epochs, warmup_lr_init=args.warmup_lr, cycle_limit=1,
                                  t_in_epochs=True)
    ema = None
    ema_decay = args.model_ema_decay
    if args.model_ema:
        ema_decay, capped = resolve_ema_decay(args.model_ema_decay, len(train_loader) * total_epochs)
        if capped and plan.rank == 0:
            _logger.warning("%s", capped)
        ema = ModelEmaV3(model, decay=ema_decay, use_warmup=args.model_ema_warmup)
    trainer = _Trainer(model, optimizer, scheduler, scaler, ema, criterion, mixup_fn, sampler, train_loader,
                       val_loader, len(train_ds), len(val_ds))
    return trainer, _Schedule(lr, total_epochs, warmup_epochs, cooldown_epochs, ema_decay)


def _restore(args: argparse.Namespace, trainer: _Trainer, resume_obj: dict[str, Any] | None) -> _Progress:
    """The counters at the start: fresh, or (--resume) the checkpoint's, with every state loaded from it."""
    progress = _Progress(best={"top1": -1.0, "epoch": -1, "weights": "ema" if trainer.ema else "model"},
                         preferred="ema" if trainer.ema else "model")
    if resume_obj is None:
        return progress
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch") if k not in resume_obj]
    if missing:
        raise T2TError(f"{args.resume} is not a checkpoint written by train.train (it lacks {missing}); "
                       f"to start from its weights use --finetune {args.resume}")
    trainer.model.load_state_dict(resume_obj["state_dict"])
    if trainer.ema is not None and resume_obj.get("state_dict_ema"):
        trainer.ema.module.load_state_dict(resume_obj["state_dict_ema"])
    trainer.optimizer.load_state_dict(resume_obj["optimizer"])
    saved, scheduler = resume_obj["scheduler"], trainer.scheduler
    if all(saved.get(k) == getattr(scheduler, k) for k in ("t_initial", "warmup_t", "lr_min", "warmup_lr_init")):
        scheduler.load_state_dict(saved)
    else:  # e.g. --epochs extended on resume: follow the schedule asked for, not the stored one
        _logger.warning("schedule flags changed since the checkpoint; the lr follows the new schedule")
    if trainer.scaler is not None and resume_obj.get("scaler"):
        trainer.scaler.load_state_dict(resume_obj["scaler"])
    progress.start_epoch = int(resume_obj["epoch"]) + 1
    progress.num_updates = int(resume_obj.get("num_updates", 0))
    progress.best = {**progress.best, **dict(resume_obj.get("best") or {})}
    progress.preferred = str(resume_obj.get("weights") or progress.preferred)
    progress.nonfinite_total = int(resume_obj.get("nonfinite_steps", 0))
    _logger.info("resumed %s after epoch %d (update %d)", args.resume, progress.start_epoch, progress.num_updates)
    return progress


def _wrap_for_training(args: argparse.Namespace, plan: RunPlan, model: nn.Module) -> nn.Module:
    """The module the steps call: compiled with --compile, in DDP across several processes."""
    train_model: nn.Module = model
    if args.compile:
        train_model = torch.compile(train_model)
    if plan.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[plan.local_rank] if plan.device.type == "cuda" else None)
    return train_model


def _record_config(args: argparse.Namespace, sources: dict[str, Any], plan: RunPlan, data: _Data,
                   data_config: DataConfig, schedule: _Schedule, trainer: _Trainer) -> dict[str, Any]:
    """Write config.yaml (the resolved flags) and log the run; returns the meta every checkpoint carries."""
    world = plan.world
    config = plain(vars(args))
    config.update({"world_size": world, "global_batch": args.batch_size * world, "lr_resolved": schedule.lr,
                   "total_epochs": schedule.total_epochs, "warmup_epochs_resolved": schedule.warmup_epochs,
                   "cooldown_epochs_resolved": schedule.cooldown_epochs,
                   "model_ema_decay_resolved": schedule.ema_decay,
                   "precision_resolved": str(plan.amp_dtype or "fp32"),
                   "device_resolved": str(plan.device), "sources": sources})
    meta = {"model": args.model, "img_size": int(args.img_size), "num_classes": int(args.num_classes),
            "class_names": list(data.class_names), "config": config, "data_config": data_config.as_dict()}
    meta = plain(meta)
    if plan.rank == 0:
        atomic_write_text(plan.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        ema_note = (f", EMA decay {schedule.ema_decay:.6g}" + (" with warmup" if args.model_ema_warmup else "")
                    if trainer.ema else "")
        _logger.info("run folder %s; %d train / %d val images, %d classes, img %d, %s, global batch %d, lr %.3g "
                     "(lr-scale %s), %d epochs (%d warmup, %d cooldown)%s", plan.out, trainer.train_images,
                     trainer.val_images, args.num_classes, args.img_size, config["precision_resolved"],
                     args.batch_size * world, schedule.lr, args.lr_scale, schedule.total_epochs,
                     schedule.warmup_epochs, schedule.cooldown_epochs, ema_note)
    return meta


def _train_epoch(args: argparse.Namespace, plan: RunPlan, trainer: _Trainer, progress: _Progress, epoch: int,
                 total_epochs: int) -> tuple[dict[str, Any], float, float]:
    """One pass over this process's shard; returns the epoch's row (before validation), mean loss and seconds."""
    skipped_images = 0
    seed_all(epoch_seed(args.seed, epoch, plan.rank))
    trainer.sampler.set_epoch(epoch)
    trainer.scheduler.step(epoch)  # per-epoch cosine, as in the authors' recipe
    epoch_lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.train_model.train()
    t0 = time.time()
    loss_sum = torch.zeros(2, dtype=torch.float64)  # sum of loss, number of steps
    seen = 0
    bar = tqdm(trainer.train_loader, desc=f"epoch {epoch + 1}/{total_epochs}", unit="batch", disable=plan.rank != 0,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for x, y, _, n_skipped in bar:
        skipped_images += n_skipped
        if x is None:
            continue
        step = _train_step(args, plan, trainer, progress, x, y, epoch)
        if step is None:
            continue
        loss, n = step
        loss_sum += torch.tensor([loss, 1.0], dtype=torch.float64)
        seen += n
        if plan.rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{epoch_lr:.2e}",
                            img_s=f"{seen * plan.world / max(time.time() - t0, 1e-9):.0f}", refresh=False)
    bar.close()
    epoch_s = time.time() - t0
    counts = torch.tensor([loss_sum[0].item(), loss_sum[1].item(), float(seen), float(skipped_images)],
                          dtype=torch.float64)
    if plan.world > 1:
        dist.all_reduce(counts)
    train_loss = counts[0].item() / max(counts[1].item(), 1.0)
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": epoch_lr, "train_loss": round(train_loss, 5),
                           "img_per_s": round(counts[2].item() / epoch_s, 2),
                           "peak_mem_mib": round(peak_memory_mib(plan.device), 1), "epoch_s": round(epoch_s, 2),
                           "nonfinite_steps": progress.nonfinite_total, "skipped_images": int(counts[3].item())}
    return row, train_loss, epoch_s


def _train_step(args: argparse.Namespace, plan: RunPlan, trainer: _Trainer, progress: _Progress,
                x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, int] | None:
    """One optimizer update; (loss, images) or None when a non-finite loss skipped it (too many in a row stop)."""
    device, mixup_fn, model = plan.device, trainer.mixup_fn, trainer.model
    if mixup_fn is not None and len(x) % 2:
        x, y = x[:-1], y[:-1]  # mixup pairs samples; a skipped image left an odd batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    target = y
    if mixup_fn is not None:
        x, target = mixup_fn(x, y)
    with torch.autocast(device.type, dtype=plan.amp_dtype) if plan.amp_dtype else nullcontext():
        output = trainer.train_model(x)
        loss = trainer.criterion(output, target)
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if plan.world > 1:  # every rank must agree to skip, or DDP's gradient all-reduce would hang
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        _skip_nonfinite(args, plan, trainer, progress, epoch)
        return None
    progress.consecutive_bad = 0
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.scaler is not None:
        trainer.scaler(loss, trainer.optimizer, clip_grad=args.clip_grad, parameters=model.parameters())
    else:
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        trainer.optimizer.step()
    progress.num_updates += 1
    if trainer.ema is not None:
        trainer.ema.update(model, step=progress.num_updates)
    return loss.item(), len(x)


def _skip_nonfinite(args: argparse.Namespace, plan: RunPlan, trainer: _Trainer, progress: _Progress,
                    epoch: int) -> None:
    """Count a skipped step; --max-nonfinite in a row stop the run, keeping the last good checkpoint."""
    progress.nonfinite_total += 1
    progress.consecutive_bad += 1
    trainer.optimizer.zero_grad(set_to_none=True)
    _logger.warning("non-finite loss at epoch %d update %d: step skipped (%d in a row, %d total)",
                    epoch + 1, progress.num_updates, progress.consecutive_bad, progress.nonfinite_total)
    if progress.consecutive_bad >= args.max_nonfinite:
        last = plan.out / "last.pth"
        raise NonFiniteLossError(
            f"{progress.consecutive_bad} non-finite losses in a row (epoch {epoch + 1}); stopping. The last good "
            f"checkpoint is {last if last.is_file() else '(none yet)'}. Try a lower --lr, "
            f"--clip-grad 1.0, or --precision bf16/fp32 instead of fp16.")


def _validate_epoch(plan: RunPlan, trainer: _Trainer, progress: _Progress, row: dict[str, Any], epoch: int) -> bool:
    """Score the raw and EMA weights into ``row``; True when the better of them is a new best."""
    m = evaluate(trainer.train_model, trainer.val_loader, plan.device, plan.amp_dtype, plan.world)
    row.update(top1=round(m["top1"], 3), top5=round(m["top5"], 3))
    if trainer.ema is not None:
        e = evaluate(trainer.ema.module, trainer.val_loader, plan.device, plan.amp_dtype, plan.world)
        row.update(ema_top1=round(e["top1"], 3), ema_top5=round(e["top5"], 3))
    progress.preferred = "ema" if row.get("ema_top1", -1.0) >= row["top1"] else "model"
    score = row["ema_top1"] if progress.preferred == "ema" else row["top1"]
    row["best_weights"] = progress.preferred
    is_best = score > progress.best["top1"]
    if is_best:
        progress.best = {"top1": score, "epoch": epoch, "weights": progress.preferred}
    return is_best


def _save(trainer: _Trainer, progress: _Progress, path: Path, epoch: int) -> None:
    """One checkpoint, written atomically: every state a resume needs, and the meta later stages read."""
    ema, scaler = trainer.ema, trainer.scaler
    state = {
        "state_dict": unwrap(trainer.model).state_dict(),
        "state_dict_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "num_updates": progress.num_updates,
        "best": dict(progress.best),
        # Which weights later stages load by default (--weights overrides): the better at validation.
        "weights": progress.best["weights"] if path.name == "best.pth" else progress.preferred,
        "nonfinite_steps": progress.nonfinite_total,
        "meta": trainer.meta,
    }
    atomic_torch_save(state, path)


def _commit_epoch(args: argparse.Namespace, plan: RunPlan, trainer: _Trainer, progress: _Progress,
                  rows: list[dict[str, Any]], done: _Epoch) -> None:
    """Rank 0: summary.csv, then best.pth, epoch_<N>.pth, last.pth, the curves and the epoch's log line."""
    out, epoch, row = plan.out, done.index, done.row
    # last.pth last: it commits the epoch. Stopped before it, a resume redoes the epoch (its CSV row is
    # dropped and rewritten, an equal best.pth rewritten); stopped after it, nothing is missing.
    rows.append(row)
    write_csv(out / "summary.csv", rows)
    if done.is_best:
        _save(trainer, progress, out / "best.pth", epoch)
    if args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0:
        _save(trainer, progress, out / f"epoch_{epoch + 1}.pth", epoch)
    _save(trainer, progress, out / "last.pth", epoch)
    plot_curves(rows, out / "curves.png", f"{args.model} img {args.img_size} on {Path(args.data).name}")
    _logger.info("epoch %d/%d: loss %.4f  top1 %s  ema_top1 %s  lr %.3g  %.1f img/s  %.0f s%s", epoch + 1,
                 args.epochs, done.train_loss, row.get("top1", "-"), row.get("ema_top1", "-"), row["lr"],
                 row["img_per_s"], done.seconds, "  (best)" if done.is_best else "")


if __name__ == "__main__":
    sys.exit(main())
