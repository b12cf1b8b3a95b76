"""The README and docs/ as tested documents: their command blocks run, on the tiny model, so they cannot drift.

Rules (also stated in the README's "How the README is tested" note):

* Every fenced ```bash block is run, in README order, unless the line just before its opening fence is
  ``<!-- readme-test: skip REASON -->`` (never run; the reason is required) or
  ``<!-- readme-test: needs tensorrt|gpu|data -->`` (run only where that exists, else skipped with the reason).
* A block that runs holds ``make`` commands only (comments and ``\\`` continuations allowed); a ``python``
  line would run with the README's full-size arguments, so it must sit in a skipped block.
* Every ``make`` command gets :data:`OVERRIDES` for its target appended: later command-line variables win
  in GNU make, so ``MODEL=t2t_vit_14`` in the README becomes ``MODEL=t2t_vit_test``, ``OUT`` goes to a
  temporary folder, epochs/limits shrink. A target without an entry here fails the test with a message
  saying to add one. After a command, the files :data:`WRITES` names for its target must exist.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
SHARED = Path(os.environ.get("T2T_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = SHARED / "imagenette2"
TINY = "t2t_vit_test"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|needs)\b\s*(.*?)\s*-->\s*$")
# The pipeline order the README must show its commands in (first appearance of each).
# Targets that would rebuild the environment, recurse into the test suite or delete artifacts.
NEVER_RUN = {"install", "test", "test-fast", "clean"}
PIPELINE = ["install", "test", "train", "validate", "onnx", "calib", "engine", "bench", "parity", "demo"]


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # "skip" | "needs" | None
    reason: str


def readme_blocks(text: str) -> list[Block]:
    """The ```bash blocks of a Markdown text with the readme-test marker on the line before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            m = MARKER.match(prev.strip())
            blocks.append(Block(start + 1, "\n".join(body), m.group(1) if m else None, m.group(2) if m else ""))
        i += 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """Shell commands of a block as argv lists (continuations joined, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def make_target(argv: list[str]) -> str | None:
    if argv[0] != "make":
        return None
    return next((a for a in argv[1:] if "=" not in a and not a.startswith("-")), "help")


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


# ------------------------------------------------------------------------------------------------
# Fast checks: structure, order, targets, markers
# ------------------------------------------------------------------------------------------------
def _name(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def all_blocks() -> list[tuple[Path, Block]]:
    """Every ```bash block of the README and of docs/*.md, in that order."""
    return [(doc, b) for doc in DOCUMENTS for b in readme_blocks(doc.read_text())]


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= 16 * 1024, f"README.md is {size} bytes; keep it a front page (rationale to docs/, numbers to reports/)"
    text = README.read_text()
    for doc in DOCS:
        assert f"docs/{doc.name}" in text, f"README does not link docs/{doc.name}"


def test_the_repository_cites_nothing_outside_itself():
    """Code, docs, recipes and tests cite primary sources, never the development notes beside the checkout."""
    outside = ("REFERENCE" + ".md", "STYLE" + ".md", "../shared/" + "REFERENCE")
    files = [p for pattern in ("*.md", "*.py", "*.yaml", "*.toml", "Makefile")
             for p in REPO.rglob(pattern) if not set(p.relative_to(REPO).parts) & {".venv", ".cache", "artifacts", "runs"}]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if any(o in line for o in outside)]
    assert not hits, f"cite the primary source instead of a file outside the repository: {hits}"


def test_readme_markers_are_well_formed():
    for doc, b in all_blocks():
        if b.marker == "skip":
            assert b.reason, f"{_name(doc)} line {b.line}: `readme-test: skip` needs a reason"
        if b.marker == "needs":
            assert b.reason in ("tensorrt", "gpu", "data"), f"{_name(doc)} line {b.line}: needs {b.reason!r}"
    for doc in DOCUMENTS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.strip().startswith("<!--") and "readme-test:" in line:
                assert MARKER.match(line.strip()), f"{_name(doc)} line {n}: malformed marker {line.strip()!r}"


def test_readme_make_commands_name_existing_targets():
    targets = makefile_targets()
    for doc, b in all_blocks():
        for argv in commands(b.code):
            t = make_target(argv)
            if t is not None:
                assert t in targets, f"{_name(doc)} line {b.line}: `make {t}` is not a Makefile target"


def test_readme_blocks_that_run_hold_only_make_commands_the_test_can_shrink(tmp_path):
    table, _ = overrides(tmp_path)
    problems = []
    for doc, b in all_blocks():
        if b.marker == "skip":
            continue
        for argv in commands(b.code):
            target = make_target(argv)
            where = f"{_name(doc)} line {b.line}"
            if target is None:
                problems.append(f"{where}: `{shlex.join(argv)[:60]}` is not a make command")
            elif target in NEVER_RUN:
                problems.append(f"{where}: `make {target}` must not run in the test suite")
            elif target not in table:
                problems.append(f"{where}: no overrides for `make {target}` in tests/test_readme.py")
    assert not problems, ("README blocks the test would run need <!-- readme-test: skip REASON --> (or "
                          "overrides):\n" + "\n".join(problems))


def test_readme_shows_the_pipeline_in_order():
    first: dict[str, int] = {}
    for b in readme_blocks(README.read_text()):
        for argv in commands(b.code):
            t = make_target(argv)
            if t in PIPELINE and t not in first:
                first[t] = b.line
    missing = [t for t in PIPELINE if t not in first]
    assert not missing, f"README has no ```bash block with `make {missing[0]}` (pipeline order: {PIPELINE})"
    # The quick start (install + demo) comes first by design; the rest must follow the pipeline.
    body = [t for t in PIPELINE if t not in ("demo",)]
    order = sorted(body, key=lambda t: first[t])
    assert order == body, f"README shows the stages in the order {order}, expected {body}"


def test_block_parsing_and_markers():
    text = ("x\n<!-- readme-test: skip builds the venv -->\n```bash\nmake install\n```\n\n"
            "```bash\nmake onnx MODEL=a \\\n  CHECKPOINT=b   # comment\n```\n"
            "<!-- readme-test: needs tensorrt -->\n\n```bash\nmake engine\n```\n")
    blocks = readme_blocks(text)
    assert [(b.marker, b.reason) for b in blocks] == [("skip", "builds the venv"), (None, ""), ("needs", "tensorrt")]
    assert commands(blocks[1].code) == [["make", "onnx", "MODEL=a", "CHECKPOINT=b"]]
    assert make_target(["make", "-s", "parity", "X=1"]) == "parity"


# ------------------------------------------------------------------------------------------------
# The slow check: run the README's blocks on the tiny model
# ------------------------------------------------------------------------------------------------
def overrides(tmp: Path) -> tuple[dict[str, dict[str, str]], dict[str, list[Path]]]:
    """make variables per target, and the files each target must have written."""
    run, out = tmp / "run", tmp / "out"
    ckpt = run / "best.pth"
    val, train = IMAGENETTE / "val", IMAGENETTE / "train"
    common = {"MODEL": TINY, "OUT": str(out), "RUN_DIR": str(run), "IMG_SIZE": "", "CHECKPOINT": str(ckpt)}
    o = {
        "train": {**common, "CHECKPOINT": "", "DATA": str(IMAGENETTE), "EPOCHS": "1", "CONFIG": "", "GPUS": "1",
                  "NNODES": "1", "BATCH_SIZE": "32",
                  "ARGS": "--limit-train 64 --limit-val 40 --workers 0 --threads 1 --warmup-epochs 0 "
                          "--cooldown-epochs 0 --aa= --mixup 0 --cutmix 0 --reprob 0"},
        "validate": {**common, "DATA": str(val), "ARGS": "--limit 40 --workers 0"},
        "onnx": {**common, "DATA": str(val), "ARGS": "--val-images 20"},
        "calib": {**common, "CALIB_DATA": str(train), "CALIB_SIZE": "16", "CALIB_METHOD": "entropy",
                  "ARGS": f"--val-data {val} --val-size 20 --workers 0 --no-progress --max-drop 100"},
        "bench-baselines": {**common, "PRECISION": "fp16", "BATCHES": "1",
                            "ARGS": "--min-time 0.05 --min-iters 1 --no-progress"},
        "bench-onnx": {"ARGS": f"--out {tmp / 'reports'} --models {TINY} --batches 1 --min-seconds 0.1 "
                               f"--no-dynamo-row"},
        "engine": {**common, "ARGS": ""},
        "bench": {**common, "BATCHES": "1", "ARGS": "--duration 1 --iterations 10"},
        "parity": {**common, "DATA": str(val), "LIMIT": "20", "LABELS": "", "BACKENDS": "",
                   "ARGS": "--workers 0 --no-progress --max-delta-top1 int8=100 --max-delta-top1 fp16=100 "
                           "--max-delta-top1 bf16=100 --min-agreement fp32=0 --max-delta-top1 fp32=100"},
        "demo": {"DEMO_DIR": str(tmp / "demo"),
                 "ARGS": f"--model {TINY} --epochs 1 --train-images 64 --val-images 40 --calib-size 16 --threads 1"},
        "help": {},
    }
    writes = {
        "train": [ckpt],
        "onnx": [out / f"{TINY}.fp32.onnx", out / f"{TINY}.fp16.onnx"],
        "calib": [out / f"{TINY}.int8.onnx"],
        "parity": [out / f"parity-{TINY}.json", out / f"parity-{TINY}.md", out / f"parity-{TINY}.png"],
        "demo": [tmp / "demo" / "demo-summary.md"],
    }
    return o, writes


def _needs_ok(what: str) -> tuple[bool, str]:
    if what == "data":
        return IMAGENETTE.is_dir(), f"no data at {IMAGENETTE}"
    import torch

    if what == "gpu":
        return torch.cuda.is_available(), "no CUDA GPU"
    if what == "tensorrt":
        from engines.backends import backend_statuses

        st = {s.backend: s for s in backend_statuses()}["tensorrt"]
        return st.available, st.reason
    return False, f"unknown requirement {what!r}"


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(1500)
def test_readme_commands_run_on_the_tiny_model(shared_data, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    table, writes = overrides(tmp_path)
    ran, skipped = [], []
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    plan: list[tuple[str, list[str], str]] = []
    for doc, b in all_blocks():
        where = f"{_name(doc)} line {b.line}"
        if b.marker == "skip":
            skipped.append((where, b.reason))
            continue
        if b.marker == "needs":
            ok, why = _needs_ok(b.reason)
            if not ok:
                skipped.append((where, why))
                continue
        for argv in commands(b.code):
            target = make_target(argv)
            assert target is not None, (
                f"{where}: `{shlex.join(argv)}` is not a make command; blocks the test runs hold "
                f"only make commands. Put it in a block marked <!-- readme-test: skip REASON -->")
            assert target not in NEVER_RUN, (
                f"{where}: `make {target}` must not run inside the test suite; mark its block "
                f"<!-- readme-test: skip REASON -->")
            assert target in table, (f"{where}: no test overrides for `make {target}`; add them to "
                                     f"tests/test_readme.py::overrides")
            plan.append((where, argv, target))
    # Everything is checked before anything runs, so a bad block never half-runs the pipeline. The README's
    # blocks run first (the pipeline in order); docs/ blocks reuse what they made.
    for where, argv, target in plan:
        cmd = argv + [f"{k}={v}" for k, v in table[target].items()] + [f"PYTHON={sys.executable}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (f"{where}: {shlex.join(argv)} failed ({proc.returncode})\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        for path in writes.get(target, []):
            assert path.exists(), f"{where}: `make {target}` did not write {path}"
        ran.append(target)
    assert "parity" in ran and "onnx" in ran, f"ran {ran}; skipped {skipped}"
