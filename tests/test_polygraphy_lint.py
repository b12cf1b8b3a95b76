"""`polygraphy check lint`, the field's own ONNX linter, on every graph kind the project writes (issue 24, item 8).

Lint loads each graph with onnx-graphsurgeon, runs ONNX's full checker and shape inference, and runs the
graph once on ONNX Runtime. It needs onnx-graphsurgeon, a core dependency for this reason (it used to sit
in the tensorrt extra, so lint failed out of the box on every graph). The graphs: the exporter's fp32 and
fp16, calibration's int8 for TensorRT (fp16 + Q/DQ) and int8-cpu (fp32 + Q/DQ), all of the tiny model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
KINDS = ("fp32", "fp16", "int8", "int8-cpu")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("lint")
    rng = np.random.default_rng(0)
    for c in ("n01440764", "n02102040"):
        (base / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(base / "train" / c / f"{i}.jpg")
    out = base / "out"
    r = subprocess.run([sys.executable, "-m", "export.to_onnx", "--model", "t2t_vit_test", "--out", str(out),
                        "--val-images", "0"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr  # calib quantizes what make onnx wrote; it never exports
    for target in ("tensorrt", "cpu"):
        r = subprocess.run([sys.executable, "-m", "calibration.calib", "--model", "t2t_vit_test", "--out", str(out),
                            "--calib-data", str(base / "train"), "--calib-size", "8", "--method", "max",
                            "--target", target, "--no-eval", "--workers", "0", "--threads", "1", "--no-progress"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    return out


def test_onnx_graphsurgeon_is_a_core_dependency():
    """What lint imports is what a plain `pip install -e .` installs."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert {"polygraphy", "onnx-graphsurgeon"} <= names
    import onnx_graphsurgeon  # noqa: F401  (installed: lint can load graphs)


@pytest.mark.parametrize("kind", KINDS)
def test_polygraphy_lint_passes(graphs, kind, tmp_path):
    graph = graphs / f"t2t_vit_test.{kind}.onnx"
    assert graph.is_file()
    report = tmp_path / "lint.json"
    polygraphy = Path(sys.executable).parent / "polygraphy"
    r = subprocess.run([str(polygraphy), "check", "lint", str(graph), "-o", str(report)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert "is required but could not be imported" not in r.stdout + r.stderr
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout + r.stderr
    lint = json.loads(report.read_text())
    # Nothing failing and nothing flagged, not even a warning: every node passed ONNX's checker and ran.
    assert lint["summary"]["failing"] == [] and lint.get("lint_entries", []) == [], lint.get("lint_entries")
    import onnx

    nodes = {n.name for n in onnx.load(str(graph)).graph.node}
    assert set(lint["summary"]["passing"]) == nodes  # every node was checked, by name
