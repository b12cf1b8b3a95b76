"""A Triton Inference Server on 127.0.0.1 serving a model's ONNX Runtime runner (``make serve``).

::

    make serve MODEL=t2t_vit_7                        # artifacts/t2t_vit_7/t2t_vit_7.fp32.onnx
    make serve MODEL=t2t_vit_7 ARTIFACT=artifacts/t2t_vit_7/t2t_vit_7.fp16.engine HTTP_PORT=8010

Runs in ``.venv-triton`` (``make install``): NVIDIA's PyTriton starts the real ``tritonserver`` binary
its wheel bundles, with Triton's Python backend proxying each batch Triton's dynamic batcher forms to the
runner here: the same :class:`~t2t_vit.runners.OnnxRuntimeRunner` parity uses (an ``.engine``: the
:class:`~engines.trt_runtime.TensorRTRunner`, where TensorRT and a GPU exist). Two models:

* ``<model>``: the preprocessed float32 tensor (``input``, ``3 x S x S``) -> ``logits``, dynamic batching up
  to ``--max-batch-size`` with the preferred sizes ``make triton`` writes;
* ``<model>-classify``: encoded image bytes (``IMAGE``) -> ``logits``, through the artifact's eval transform
  (the repository's preprocessing model); a request with bytes that are not an image gets an error
  response, the others are answered.

Ports are checked before start: a busy one is one line and exit 2. The server stops on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

import numpy as np

# Only the standard library and numpy at module level: a busy port is refused in a second, before torch,
# timm and the runners load (the project imports below are function-local for that reason).
__all__ = ["busy_port", "get_args_parser", "main"]

TOOL = "serving.server"
READY = "serving.server: ready"


def busy_port(host: str, ports: dict[str, int]) -> str:
    """Why a port cannot be listened on ('' when all are free): Triton itself would fail deep in its log."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR: a port whose last server was killed (connections in TIME_WAIT) is free to listen on
            # again, as Triton itself will; only a socket still listening makes bind() fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return (f"{host}:{port} ({what}) is already in use, probably by another `make serve`: stop it, or "
                        f"pick free ports with HTTP_PORT=... GRPC_PORT=...")
    return ""


def _libpython_env() -> None:
    """Triton's Python-backend stub links libpython3.x dynamically; point it at this interpreter's, so the
    stub and the standard library it loads are the same Python build (a system libpython of another
    patch release fails inside multiprocessing)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, sysconfig.get_config_var("LDLIBRARY") or "").is_file():
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def _batch_list(spec: str) -> list[int]:
    """``"4,8"`` -> [4, 8] (argparse type: a bad list is a usage error, exit 2)."""
    try:
        sizes = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of batch sizes: {spec!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {spec!r}")
    return sizes


def _bind_models(triton: Any, clf: Any, args: argparse.Namespace) -> list[str]:
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    from serving.triton_python.preprocess import BadImage, transform  # local: after the port check (see top)
    from serving.triton_repo import _preferred  # local: after the port check (see top)

    size = clf.data_config.img_size
    cfg = clf.data_config.as_dict()
    classes = int(clf.runner.infer(torch.zeros(1, 3, size, size)).shape[1])

    @batch
    def classify_tensor(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 - the graph's input name
        return {"logits": clf.runner.infer(torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)))}

    def classify_bytes(requests: list) -> list[dict[str, np.ndarray]]:
        out = []
        for req in requests:
            blobs = [bytes(b) for b in np.asarray(req["IMAGE"]).reshape(-1)]
            big = max(len(b) for b in blobs)
            if big > args.max_image_bytes:  # refused before decoding: a huge upload must not stall the server
                raise ValueError(f"IMAGE: {big} bytes is over the {args.max_image_bytes}-byte limit (--max-image-bytes)")
            try:
                x = np.stack([transform(b, cfg) for b in blobs])
            except BadImage as e:  # an error response (for the requests executed with it), the server goes on
                raise ValueError(f"IMAGE: {e}") from None
            out.append({"logits": clf.runner.infer(torch.from_numpy(x))})
        return out

    preferred = ([b for b in args.preferred_batch_size if b <= args.max_batch_size] if args.preferred_batch_size
                 else _preferred(args.max_batch_size))
    batcher = DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us, preferred_batch_size=preferred)
    triton.bind(model_name=clf.model, infer_func=classify_tensor,
                inputs=[Tensor(name="input", dtype=np.float32, shape=(3, size, size))],
                outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher), strict=True)
    triton.bind(model_name=f"{clf.model}-classify", infer_func=classify_bytes,
                inputs=[Tensor(name="IMAGE", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                config=ModelConfig(max_batch_size=8, batching=True), strict=True)
    return [clf.model, f"{clf.model}-classify"]


def serve(args: argparse.Namespace) -> int:
    from serving.predict import load_classifier  # local: after the port check (see top)
    from t2t_vit.artifacts import default_out, onnx_path  # local: after the port check (see top)
    from t2t_vit.cli import apply_threads  # local: after the port check (see top)
    from t2t_vit.errors import Interrupted, T2TError  # local: after the port check (see top)

    if not args.model and not args.artifact:
        raise T2TError("pass --model (MODEL=) or --artifact (ARTIFACT=)")
    artifact = Path(args.artifact) if args.artifact else onnx_path(args.out or default_out(args.model), args.model, "fp32")
    threads = apply_threads(args.threads)
    clf = load_classifier(artifact, args.model, threads=threads, spinning=args.ort_spinning)
    try:
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise T2TError("PyTriton is not importable here: run the server with .venv-triton/bin/python "
                         "(`make serve`; `make install` creates it)") from None
    _libpython_env()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, allow_metrics=False, exit_timeout_secs=5,
                          log_verbose=0)
    # Statistics stay open (the load test reads the batch sizes Triton formed); loading and unloading models,
    # shared memory, tracing and logging settings need PyTriton's token.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    stop = threading.Event()
    with clf.runner, Triton(config=config, security_config=security) as triton:
        names = _bind_models(triton, clf, args)
        triton.run()
        print(f"{READY}: http 127.0.0.1:{args.http_port} grpc 127.0.0.1:{args.grpc_port} models {','.join(names)} "
              f"runner {clf.runner.name} threads {threads} spinning {'on' if args.ort_spinning else 'off'} "
              f"max_batch_size {args.max_batch_size}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except (KeyboardInterrupt, Interrupted):
            print(f"{TOOL}: stopping", file=sys.stderr, flush=True)
    return 0


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(TOOL, add_help=add_help, description="Triton on 127.0.0.1 serving a model's runner")
    p.add_argument("--model", default=None, help="registered model name (default: the one the artifact records)")
    p.add_argument("--out", default=None, help="artifact folder (default artifacts/<model>)")
    p.add_argument("--artifact", default=None, help="the .onnx or .engine to serve (default <out>/<model>.fp32.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="listen address: 127.0.0.1 only")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--max-batch-size", type=int, default=32, help="largest batch Triton's dynamic batcher forms")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long Triton may hold a request to form a batch (default 2000)")
    p.add_argument("--preferred-batch-size", type=_batch_list, default=None,
                   help="comma list of the batch sizes the dynamic batcher prefers (default: every power of two up "
                        "to --max-batch-size); with more requests queued it forms the largest of these, so a list "
                        "that stops at the runner's most efficient batch keeps the next batch queued while one runs")
    p.add_argument("--max-image-bytes", type=int, default=16 << 20,
                   help="largest encoded image the -classify model accepts (default 16 MiB)")
    p.add_argument("--threads", default="auto", help="runner intra-op threads (a number, or auto: the idle cores)")
    p.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, default=False,
                   help="let ONNX Runtime's idle pool threads busy-wait (default off: they would take the CPU "
                        "Triton's own threads need on the same cores; docs/serving.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    why = ("--host: this server listens on 127.0.0.1 only" if args.host not in ("127.0.0.1", "localhost")
           else busy_port("127.0.0.1", {"HTTP": args.http_port, "gRPC": args.grpc_port}))
    if why:
        print(f"{TOOL}: error: {why}", file=sys.stderr)
        return 2
    from t2t_vit.cli import run_command  # local: after the port check (see top)

    return run_command(lambda: serve(args), TOOL)


if __name__ == "__main__":
    sys.exit(main())
