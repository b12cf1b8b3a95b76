"""Summarise a finished run folder into committed reports: ``<out>/<name>.{json,md}`` + ``<name>-curves.png``.

    python -m train.report --run runs/imagenette-t2t_vit_7 --name train-imagenette-cpu \
        --validate artifacts/t2t_vit_7/validate-imagenette2-val.json --command "make train-imagenette-cpu"

Per-epoch rows come from the run's ``summary.csv``, the recipe from its ``config.yaml``, the final
full-split accuracy from a ``train.validate`` JSON (optional).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import yaml

from t2t_vit.files import atomic_write_text

from .train import read_csv
from .validate import hardware


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a run folder's results as reports", add_help=add_help)
    p.add_argument("--run", required=True, help="run folder (summary.csv, config.yaml, curves.png)")
    p.add_argument("--name", required=True, help="report base name, e.g. train-imagenette-cpu")
    p.add_argument("--validate", default=None, help="train.validate JSON of the final checkpoint")
    p.add_argument("--command", default=None, help="the command that produced the run (recorded verbatim)")
    p.add_argument("--note", default=None, help="free text added to the Markdown")
    p.add_argument("--out", default="reports")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    run = Path(args.run)
    rows = read_csv(run / "summary.csv")
    if not rows:
        print(f"error: {run}/summary.csv has no epochs yet", file=sys.stderr)
        return 1
    config = yaml.safe_load((run / "config.yaml").read_text())
    val = json.loads(Path(args.validate).read_text()) if args.validate else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = [{k: (float(v) if v not in ("", None) and k != "epoch" else (int(v) if k == "epoch" else None))
               for k, v in r.items()} for r in rows]
    best = max((e for e in epochs if e.get("ema_top1") is not None), key=lambda e: e["ema_top1"], default=None)
    report = {
        "run": str(run), "command": args.command, "model": config["model"], "img_size": config["img_size"],
        "epochs_done": len(epochs), "total_epochs": config.get("total_epochs"),
        "wall_time_s": epochs[-1]["wall_s"], "config": config, "epochs": epochs,
        "best_epoch_by_ema_top1": best, "final_validation": val, "hardware": hardware(),
    }
    curves = out / f"{args.name}-curves.png"
    if (run / "curves.png").is_file():
        shutil.copyfile(run / "curves.png", curves)
    atomic_write_text(out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")

    hw = report["hardware"]
    lines = [f"# {config['model']} trained on {Path(config['data']).name} ({config['img_size']} px, {hw['gpu'] or 'CPU'})", ""]
    if args.command:
        lines += ["```bash", args.command, "```", ""]
    lines += [f"Hardware: {hw['gpu'] or hw['cpu']}, {hw['cpu_cores']} cores, torch {hw['torch']}; "
              f"precision {config.get('precision_resolved')}, global batch {config.get('global_batch')}, "
              f"lr {config.get('lr_resolved')}, {config.get('total_epochs')} epochs.",
              f"Wall time: {report['wall_time_s'] / 60:.1f} min for {len(epochs)} epochs (training + per-epoch validation).", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| epoch | lr | train loss | top-1 | top-5 | EMA top-1 | EMA top-5 | img/s | peak MiB | epoch s |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for e in epochs:
        lines.append(f"| {e['epoch'] + 1} | {f(e['lr'], '{:.2e}')} | {f(e['train_loss'], '{:.4f}')} | {f(e['top1'])} | "
                     f"{f(e['top5'])} | {f(e['ema_top1'])} | {f(e['ema_top5'])} | {f(e['img_per_s'], '{:.1f}')} | "
                     f"{f(e['peak_mem_mib'], '{:.0f}')} | {f(e['epoch_s'], '{:.0f}')} |")
    if config.get("limit_val"):
        lines += ["", f"Per-epoch accuracy is on a class-balanced {config['limit_val']}-image subset of val."]
    if val:
        lines += ["", f"Final: `{val['checkpoint']}` ({val['weights']}) on the full `{val['data']}` "
                      f"({val['images']} images, eval transform {val['data_config']}): "
                      f"**top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%** (chance: 10%)."]
    if curves.is_file():
        lines += ["", f"![curves]({curves.name})"]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / args.name}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
