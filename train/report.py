"""Summarise a training run folder into committed reports: ``<out>/<name>.{json,md,png}``.

    python -m train.report --run runs/imagenette-t2t_vit_7 --name train-imagenette-cpu \
        --checkpoint runs/imagenette-t2t_vit_7/best.pth \
        --validate runs/imagenette-t2t_vit_7/validate-imagenette2-val.json --command "make train-imagenette-cpu"

Per-epoch rows come from the run's ``summary.csv``, the recipe from its ``config.yaml``, the final
full-split accuracy from a ``train.validate`` JSON, the checkpoint's sha256 from the file itself.
The PNG holds the learning curves (loss, top-1 of the raw and EMA weights, lr) by epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from t2t_vit.cli import run_command
from t2t_vit.errors import T2TError
from t2t_vit.files import file_sha256
from t2t_vit.reports import host_line, markdown_table, report_header, write_report

from .train import learning_curves, read_csv

__all__ = ["get_args_parser", "summarize_run", "main"]

_TEXT_FIELDS = {"best_weights"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a run folder's results as reports", add_help=add_help)
    p.add_argument("--run", required=True, help="run folder (summary.csv, config.yaml)")
    p.add_argument("--name", required=True, help="report base name, e.g. train-imagenette-cpu")
    p.add_argument("--checkpoint", default=None, help="the run's final checkpoint (its sha256 is recorded)")
    p.add_argument("--validate", default=None, help="train.validate JSON of the final checkpoint")
    p.add_argument("--command", default=None, help="the command that produced the run (recorded verbatim)")
    p.add_argument("--note", default=None, help="free text added to the Markdown")
    p.add_argument("--out", default="reports")
    return p


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v in ("", None):
            out[k] = None
        elif k == "epoch":
            out[k] = int(v)
        elif k in _TEXT_FIELDS:
            out[k] = v
        else:
            out[k] = float(v)
    return out


def summarize_run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    run = Path(args.run)
    rows = read_csv(run / "summary.csv")
    if not rows:
        raise T2TError(f"{run}/summary.csv has no finished epochs yet; train first (make train-imagenette-cpu)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    val = json.loads(Path(args.validate).read_text()) if args.validate else None
    epochs = [_parse_row(r) for r in rows]

    def score(e: dict[str, Any]) -> float:
        return max(v for v in (e.get("top1"), e.get("ema_top1")) if v is not None)

    evaluated = [e for e in epochs if e.get("top1") is not None]
    best = max(evaluated, key=score, default=None)
    report = {
        **report_header("train.report", argv),
        "run": str(run), "run_command": args.command, "model": config["model"], "img_size": config["img_size"],
        "epochs_done": len(epochs), "total_epochs": config.get("total_epochs"),
        "wall_time_s": epochs[-1]["wall_s"], "train_time_s": sum(e["epoch_s"] or 0.0 for e in epochs),
        "checkpoint": args.checkpoint,
        "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
        "config": config, "epochs": epochs, "best_epoch": best, "final_validation": val,
    }
    host = report["host"]
    title = f"{config['model']} at {config['img_size']} px on {Path(str(config['data'])).name}"
    lines = [f"# {title} ({(host.get('gpu') or {}).get('name') or 'CPU'})", ""]
    if args.command:
        lines += ["```bash", args.command, "```", ""]
    lines += [f"Machine at report time: {host_line(host)}.",
              f"Recipe: precision {config.get('precision_resolved')}, {config.get('threads') or 'default'} torch "
              f"threads, global batch {config.get('global_batch')}, lr {config.get('lr_resolved')}, "
              f"{config.get('total_epochs')} epochs ({config.get('warmup_epochs_resolved')} warmup, "
              f"{config.get('cooldown_epochs_resolved')} cooldown), EMA decay {config.get('model_ema_decay_resolved')}.",
              f"Wall time: {report['wall_time_s'] / 3600:.2f} h for {len(epochs)} epochs "
              f"({report['train_time_s'] / 3600:.2f} h of it in training steps; the rest is validation and "
              f"checkpoints).", ""]
    started = config.get("sources") or {}
    if started.get("finetune"):
        lines += [f"Fine-tuned from `{started['finetune']}` (sha256 `{started.get('finetune_sha256')}`).", ""]
    if args.note:
        lines += [args.note, ""]
    if val:
        lines += [f"**Final: `{val['checkpoint']}` ({val['weights']} weights) on the full `{val['data']}` "
                  f"({val['images']} images): top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%** "
                  f"(chance {100 / max(int(config.get('num_classes') or 10), 1):.0f}%).", ""]
    if report["checkpoint_sha256"]:
        lines += [f"Checkpoint sha256: `{report['checkpoint_sha256']}`", ""]
    if best is not None:
        lines += [f"Best validation: epoch {best['epoch']}, top-1 {score(best):.2f}% ({best.get('best_weights')} "
                  f"weights).", ""]
    table = [[e["epoch"], e["lr"], e["train_loss"], e.get("top1"), e.get("top5"), e.get("ema_top1"),
              e.get("ema_top5"), e.get("img_per_s"), e.get("epoch_s")] for e in epochs]
    lines += [markdown_table(["epoch", "lr", "train loss", "top-1", "top-5", "EMA top-1", "EMA top-5", "img/s",
                              "epoch s"], table), ""]
    if config.get("limit_val"):
        lines += [f"Per-epoch accuracy is on a class-balanced {config['limit_val']}-image subset of val.", ""]
    name = f"{args.name}"
    lines += [f"![curves]({name}.png)", ""]
    write_report(Path(args.out) / name, report, "\n".join(lines), learning_curves(epochs, title))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        summarize_run(args, argv)
        print(f"wrote {Path(args.out) / args.name}.json/.md/.png")
        return 0

    return run_command(body, "train.report")


if __name__ == "__main__":
    sys.exit(main())
