"""Quantize one ONNX graph with NVIDIA Model Optimizer; runs INSIDE ModelOpt's own virtualenv.

``make modelopt`` (``calibration.compare_modelopt``) runs this file with ``.venv-modelopt/bin/python``,
once per mode. ModelOpt's onnx extra pins older onnx/onnxruntime than the project's, so this script
imports nothing of the project: only the standard library, numpy and ``modelopt``. It calls
``modelopt.onnx.quantization.quantize`` with ModelOpt's defaults, except the three things a CPU-only
side-by-side needs (calibration on the CPU execution provider, the calibration images given as one
array, the output path) and ``--calibration-method`` when given, and always writes ``--result`` (JSON):
``ok``, the ModelOpt version, the keyword arguments passed, the seconds taken, and on failure the
exception's type, message and the traceback's last lines, so the report can record the exact error.

    python calibration/modelopt_runner.py --onnx m.fp32.onnx --calib calib.npy --mode fp8 \\
        --output m.modelopt-fp8.onnx --result m.modelopt-fp8.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="fp32 ONNX graph to quantize")
    p.add_argument("--calib", required=True, help=".npy of preprocessed calibration images (N, 3, H, W), float32")
    p.add_argument("--mode", required=True, choices=("int8", "fp8"), help="ModelOpt quantize_mode")
    p.add_argument("--output", required=True, help="quantized ONNX path")
    p.add_argument("--result", required=True, help="JSON result (always written)")
    p.add_argument("--calibration-method", default=None,
                   help="ModelOpt's calibration_method (default: not passed, ModelOpt's own default)")
    args = p.parse_args(argv)
    result: dict = {"ok": False, "mode": args.mode, "python": sys.version.split()[0]}
    t0 = time.perf_counter()
    try:
        import numpy as np

        import modelopt
        from modelopt.onnx.quantization import quantize

        result["modelopt"] = getattr(modelopt, "__version__", "unknown")
        try:
            import onnx
            import onnxruntime

            result["onnx"], result["onnxruntime"] = onnx.__version__, onnxruntime.__version__
        except Exception as e:  # noqa: BLE001 - versions are informative
            result["versions_error"] = repr(e)
        data = np.load(args.calib).astype(np.float32)
        kwargs = {"quantize_mode": args.mode, "calibration_eps": ["cpu"], "output_path": args.output}
        if args.calibration_method:
            kwargs["calibration_method"] = args.calibration_method
        result["kwargs"] = dict(kwargs, calibration_data=f"{args.calib} {list(data.shape)}")
        # ModelOpt writes intermediate files beside its input (its ORT calibration a shape-inferred copy):
        # it gets a private copy of the graph in a work folder next to the output, removed afterwards, so the
        # project's fp32 graph and its folder are never touched.
        work = tempfile.mkdtemp(prefix=f".work-{args.mode}-", dir=os.path.dirname(os.path.abspath(args.output)))
        try:
            src = os.path.join(work, os.path.basename(args.onnx))
            shutil.copyfile(args.onnx, src)
            kwargs["output_path"] = os.path.join(work, "quantized.onnx")
            quantize(src, calibration_data=data, **kwargs)
            os.replace(kwargs["output_path"], args.output)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result["ok"] = True
        result["output"] = args.output
    except BaseException as e:  # noqa: BLE001 - everything ModelOpt raises goes into the report
        result["error"] = {"type": type(e).__name__, "message": str(e)[:2000],
                           "traceback": traceback.format_exc().splitlines()[-25:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(args.result, result)
    return 0 if result["ok"] else 2  # the reason is in --result


if __name__ == "__main__":
    sys.exit(main())
