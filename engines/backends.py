"""Which inference backends this machine can run, and why the others cannot (``python -m engines.backends``)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Sequence

from t2t_vit.runners import OnnxRuntimeRunner, TorchRunner

from .trt_runtime import TensorRTRunner

__all__ = ["BackendStatus", "backend_statuses", "get_args_parser", "main"]


@dataclass(frozen=True)
class BackendStatus:
    """One backend family on this machine: whether it runs, and if not, why."""

    backend: str
    available: bool
    reason: str = ""


def backend_statuses() -> list[BackendStatus]:
    """Every backend family this project knows, with availability and the reason when unavailable."""
    out = []
    for backend, (ok, why) in (
        ("pytorch-cpu", TorchRunner.availability("cpu")),
        ("pytorch-cuda", TorchRunner.availability("cuda")),
        ("onnxruntime-cpu", OnnxRuntimeRunner.availability("cpu")),
        ("onnxruntime-cuda", OnnxRuntimeRunner.availability("cuda")),
        ("tensorrt", TensorRTRunner.availability()),
    ):
        out.append(BackendStatus(backend, bool(ok), "" if ok else str(why)))
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="List the inference backends available on this machine",
                                     add_help=add_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    statuses = backend_statuses()
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        width = max(len(s.backend) for s in statuses)
        for s in statuses:
            print(f"{s.backend:<{width}}  {'available' if s.available else 'skipped: ' + s.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
