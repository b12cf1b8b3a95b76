"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("T2T_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = SHARED_DATA / "imagenette2"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (Imagenette2 and the ImageNet class list), or skip."""
    if not (IMAGENETTE / "val").is_dir():
        pytest.skip(f"real image data not found at {IMAGENETTE} (set T2T_SHARED_DATA to its parent folder)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    import shutil

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    try:
        import importlib.util

        has_trt = importlib.util.find_spec("tensorrt") is not None
    except Exception:  # pragma: no cover
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to PyTorch"))
        if "tensorrt" in item.keywords and not (has_trt and has_gpu):
            why = "TensorRT Python package not installed" if not has_trt else "no CUDA GPU"
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a GPU: {why} (pip install -e '.[tensorrt]')"))
        if "trtexec" in item.keywords and shutil.which("trtexec") is None:
            item.add_marker(pytest.mark.skip(reason="needs the trtexec binary on PATH"))


REFERENCE_RUN = REPO / "runs" / "imagenette-t2t_vit_7"


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    """best.pth of the finished reference run (`make train-imagenette-cpu`), or skip: the accuracy claims
    tested with it hold for a trained network, not for an unfinished or absent run."""
    import torch

    best, last = REFERENCE_RUN / "best.pth", REFERENCE_RUN / "last.pth"
    if not (best.is_file() and last.is_file()):
        pytest.skip(f"needs the reference checkpoint {best} (make train-imagenette-cpu)")
    ck = torch.load(last, map_location="cpu", weights_only=True)
    done, total = int(ck["epoch"]) + 1, int(ck["meta"]["config"]["total_epochs"])
    if done < total:
        pytest.skip(f"the reference run in {REFERENCE_RUN} is unfinished ({done}/{total} epochs)")
    return best
