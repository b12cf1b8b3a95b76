"""One driver for the studies: ``python -m studies <question> [its flags]``.

Each question is one study module, one ``make`` target and one report in ``reports/``;
``python -m studies --help`` lists them, ``python -m studies <question> --help`` shows a study's flags.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Sequence

from t2t_vit.cli import run_command
from t2t_vit.errors import T2TError


class Question(NamedTuple):
    module: str
    target: str
    asks: str


QUESTIONS: dict[str, Question] = {
    "model": Question("studies.bench_model", "bench-model",
                      "what SDPA saves over explicit attention (time, memory), and fp32 forward throughput"),
    "train": Question("studies.bench_train", "bench-train",
                      "training img/s and peak memory per model, SDPA vs explicit attention"),
    "onnx": Question("studies.bench_onnx", "bench-onnx",
                     "what the export patterns buy on ONNX Runtime CPU: patterned fp32 vs plain export vs fp16"),
    "calib": Question("studies.bench_calib", "bench-calib",
                      "ONNX Runtime CPU throughput of the fp32, fp16 and int8 graphs"),
    "cpu": Question("studies.bench_cpu", "bench-cpu",
                    "how much faster than the authors' code the model runs on a CPU (ONNX Runtime and PyTorch)"),
    "busy": Question("studies.bench_busy", "bench-busy",
                     "what a competing job costs the demo's training step, per thread setting"),
    "gpu": Question("studies.gpu_check", "gpu-check",
                    "on a lent CUDA GPU: golden parity, fp16/bf16 autocast agreement, training SDPA vs the authors'"),
}
TOOL = "studies"


def usage() -> str:
    width = max(map(len, QUESTIONS))
    rows = [f"  {name:<{width}}  make {q.target:<12} {q.asks}" for name, q in QUESTIONS.items()]
    return ("usage: python -m studies <question> [flags of that study; --help lists them]\n\nquestions:\n"
            + "\n".join(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0

    def pick() -> int:
        if not argv or argv[0] not in QUESTIONS:
            got = f"unknown question {argv[0]!r}" if argv else "no question given"
            raise T2TError(f"{got}; name one of {', '.join(QUESTIONS)} (python -m studies --help lists what each "
                           f"answers)")
        return 0

    rc = run_command(pick, TOOL)
    if rc:
        return rc
    # Imported on demand: each study pulls in its own heavy stack (ONNX Runtime, the training loop).
    study = importlib.import_module(QUESTIONS[argv[0]].module)
    sys.argv[0] = f"python -m studies {argv[0]}"  # the usage line argparse prints names this command
    return study.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
