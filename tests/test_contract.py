"""The project's cross-cutting contract: import direction, one CLI exit-code convention, one report header.

* Imports go one way: t2t_vit (model package and shared machinery) <- train, export <- calibration <-
  engines <- evaluation <- studies (nothing imports a study). No cycles between modules, and no
  function-local import of a project module unless its line states why (``# local: <reason>``).
* Every command exits 2 on bad input with one ``<tool>: error: ...`` line and no traceback.
* Every JSON report starts with the same header keys (``t2t_vit.reports.HEADER_KEYS``).
"""
from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"t2t_vit": 0, "train": 1, "export": 1, "calibration": 2, "engines": 3, "evaluation": 4, "serving": 5,
          "studies": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module or package, line, at module level) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as module level
        for sub in ast.walk(node):
            top_level.add(id(sub))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        for t in targets:
            if t.split(".")[0] in LAYERS:
                found.append((t, node.lineno, id(node) in top_level and not _in_function(tree, node)))
    return found


def _in_function(tree: ast.AST, target: ast.AST) -> bool:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(fn):
                if sub is target:
                    return True
    return False


def test_imports_go_one_way():
    problems = []
    for name, path in MODULES.items():
        pkg = name.split(".")[0]
        for target, line, _ in _imports(name, path):
            other = target.split(".")[0]
            if other == pkg:
                continue
            if LAYERS[other] > LAYERS[pkg] or (LAYERS[other] == LAYERS[pkg]):
                problems.append(f"{path.relative_to(REPO)}:{line} imports {target} ({other} is not below {pkg})")
    assert not problems, ("imports must go t2t_vit <- train/export <- calibration <- engines <- evaluation <- "
                          "studies:\n") + \
        "\n".join(problems)


def test_no_function_local_project_imports_without_a_reason():
    problems = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, module_level in _imports(name, path):
            if not module_level and "# local:" not in lines[line - 1]:
                problems.append(f"{path.relative_to(REPO)}:{line} imports {target} inside a function")
    assert not problems, ("import project modules at the top of the file (or state why not with "
                          "`# local: <reason>` on the line):\n" + "\n".join(problems))


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _, module_level in _imports(name, path):
            if module_level and target in MODULES and target != name:
                deps.add(target)
        graph[name] = deps
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package __init__ importing its own submodules is how packages expose names, not a cycle.
    cycles = [c for c in cycles if not all(part.split(".")[0] == c.split(".")[0] for part in c.split(" -> "))
              or not any(MODULES[p].name == "__init__.py" for p in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# ----------------------------------------------------------------------------------------------------
# Exit codes: bad input -> 2, one line, no traceback
# ----------------------------------------------------------------------------------------------------
COMMANDS_BAD_INPUT = {
    "train.train": ["--model", "t2t_vit_test", "--data", "/nonexistent/data", "--out", "{tmp}/run"],
    "train.validate": ["--model", "t2t_vit_test", "--data", "/nonexistent/val", "--out", "{tmp}"],
    "train.report": ["--run", "{tmp}/no-run", "--name", "x", "--out", "{tmp}"],
    "studies.bench_train": ["--models", "t2t_vit_test", "--attn", "flash", "--out", "{tmp}"],
    "export.to_onnx": ["--model", "no_such_model", "--out", "{tmp}"],
    "studies.bench_onnx": ["--models", "no_such_model", "--out", "{tmp}"],
    "calibration.calib": ["--model", "t2t_vit_test", "--out", "{tmp}", "--calib-data", "/nonexistent/train"],
    "studies.bench_calib": ["--models", "no_such_model", "--out", "{tmp}", "--work", "{tmp}/work"],
    "calibration.compare_modelopt": ["--model", "t2t_vit_test", "--out", "{tmp}", "--calib-data", "/nonexistent/train",
                                     "--modelopt-python", "{tmp}/no-venv/bin/python"],
    "engines.build": ["--model", "t2t_vit_test", "--out", "{tmp}", "--dry-run"],
    "engines.bench": ["--model", "t2t_vit_test", "--out", "{tmp}", "--tensorrt", "require"],
    "engines.trtexec_log": ["{tmp}/missing.log"],
    "evaluation.parity": ["--model", "t2t_vit_test", "--out", "{tmp}", "--data", "/nonexistent/val"],
    "evaluation.demo": ["--out", "{tmp}/demo", "--steps", "data,fly"],
    "evaluation.layerwise": ["--model", "t2t_vit_test", "--out", "{tmp}", "--precision", "fp16"],
    "studies.bench_busy": ["--conditions", "noisy:auto", "--out", "{tmp}"],
    "studies.bench_cpu": ["--models", "no_such_model", "--out", "{tmp}", "--work", "{tmp}/work"],
    "evaluation.precision": ["--model", "t2t_vit_test", "--out", "{tmp}", "--data", "/nonexistent/val"],
    "evaluation.evidence": ["--model", "t2t_vit_test", "--out", "{tmp}", "--checkpoint", "{tmp}/missing.pth"],
    "studies.gpu_check": ["--dry-run", "--out", "{tmp}", "--checkpoint", "{tmp}/missing.pth"],
    "serving.predict": ["--artifact", "{tmp}/missing.onnx", "--images", "a.jpg"],
    "serving.triton_repo": ["--model", "t2t_vit_test", "--out", "{tmp}/none"],
    "serving.server": ["--artifact", "{tmp}/missing.onnx", "--http-port", "1", "--grpc-port", "2"],
    "serving.loadtest": ["--model", "t2t_vit_test", "--artifacts", "{tmp}"],
    "studies.bench_model": ["--out", "{tmp}", "--attn-model", "no_such_model", "--throughput-models", "x"],
    "studies.__main__": ["no_such_question"],
}


def test_every_command_is_listed():
    with_main = {n for n, p in MODULES.items() if "def main(" in p.read_text() and "__name__ == \"__main__\"" in p.read_text()}
    # calibration.modelopt_runner runs inside ModelOpt's own virtualenv (no project imports) as compare_modelopt's
    # subprocess, which reads its result JSON; it is not a user command.
    internal = {"engines.backends", "calibration.modelopt_runner"}
    assert with_main - internal == set(COMMANDS_BAD_INPUT), "add the new command to COMMANDS_BAD_INPUT"


@pytest.mark.parametrize("module", sorted(COMMANDS_BAD_INPUT))
def test_bad_input_exits_2_with_one_line(module, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in COMMANDS_BAD_INPUT[module]]
    rc = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    tool = module.removesuffix(".__main__")  # python -m studies names itself "studies"
    assert len(errors) == 1 and errors[0].startswith(f"{tool}: error:"), err


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing (simulated at the atomic write) is exit 2 and one line; nothing is left behind."""
    import errno

    from export import to_onnx
    from t2t_vit import files

    real = files.atomic_write

    def full(path, write):
        def failing(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, failing)

    monkeypatch.setattr(files, "atomic_write", full)
    monkeypatch.setattr(to_onnx, "atomic_save_onnx", lambda proto, path: full(path, None))
    out = tmp_path / "o"
    rc = to_onnx.main(["--model", "t2t_vit_test", "--img-size", "32", "--out", str(out), "--val-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no space left on the device" in err and "t2t_vit_test.fp32.onnx" in err
    assert not list(out.iterdir())


# ----------------------------------------------------------------------------------------------------
# Reports: one header, percent units
# ----------------------------------------------------------------------------------------------------
def test_committed_reports_share_the_header_and_units():
    from t2t_vit.reports import HEADER_KEYS

    reports = sorted((REPO / "reports").glob("*.json"))
    assert reports
    problems = []
    for p in reports:
        r = json.loads(p.read_text())
        missing = [k for k in HEADER_KEYS if k not in r]
        if missing:
            problems.append(f"{p.name}: no {missing}")
            continue
        if not r["command"].startswith("python -m ") or not isinstance(r["host"], dict):
            problems.append(f"{p.name}: command/host malformed")

        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k in ("top1_agreement", "top1", "top5") and isinstance(v, (int, float)) and not 0 <= v <= 100:
                        problems.append(f"{p.name}: {k}={v} is not a percentage")
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(r)
    assert not problems, "\n".join(problems)
