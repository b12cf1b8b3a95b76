"""Every TensorRT name the engines code uses exists in TensorRT 10.13 and 11.4; removed names are never used.

TensorRT cannot be installed here, so the check is static. ``make install`` downloads the binding
wheels ``tensorrt-cu12-bindings==10.13.3.9`` and ``tensorrt-cu13-bindings==11.4.0.106`` into
``.cache/tensorrt-bindings/``; this test opens them with zipfile (no install), reads the printable
strings of the compiled ``tensorrt.so`` (like binutils' ``strings``) plus the names its ``__init__.py``
defines, and looks up every name in ``engines.trt_compat.TRT_NAMES_USED``.

A name counts as present when a string equals it or is an identifier ending with it: linkers merge a
string into the tail of a longer one (``Logger`` is stored as the end of ``ILogger``). The source side
is collected by AST from ``engines.trt_compat.TRT_MODULES``: attributes read on the ``trt`` module and
on variables named in ``TRT_OBJECT_NAMES``, plus ``getattr``/``hasattr`` strings on them.
"""
from __future__ import annotations

import ast
import re
import zipfile
from functools import lru_cache
from pathlib import Path

import pytest

from engines.trt_compat import (TRT_MODULES, TRT_NAMES_FORBIDDEN, TRT_NAMES_REMOVED_IN_11, TRT_NAMES_USED,
                                TRT_NAMES_VERSION_GATED, TRT_OBJECT_NAMES)

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".cache" / "tensorrt-bindings"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Removed names the string reader can tell apart (INT8 cannot: "UINT8" still ends with it in 11).
REMOVED_DETECTABLE = ("FP16", "int8_calibrator", "IInt8EntropyCalibrator2", "IInt8Calibrator", "EXPLICIT_BATCH",
                      "platform_has_fast_fp16", "platform_has_fast_int8")


# ----------------------------------------------------------------------------------------------------
# The wheels' side
# ----------------------------------------------------------------------------------------------------
def printable_strings(data: bytes, min_len: int = 4) -> set[str]:
    """Runs of at least ``min_len`` printable ASCII characters, like ``strings -a``."""
    return {m.decode("ascii") for m in re.findall(rb"[\x20-\x7e]{%d,}" % min_len, data)}


def init_names(source: str) -> set[str]:
    """Names a package ``__init__.py`` defines at module level or assigns onto its classes."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                elif isinstance(t, ast.Attribute):
                    names.add(t.attr)
    return names


class Bindings:
    def __init__(self, wheel: Path):
        with zipfile.ZipFile(wheel) as z:
            so = [n for n in z.namelist() if re.fullmatch(r"tensorrt_bindings/tensorrt[^/]*\.so", n)]
            assert so, f"{wheel.name} has no tensorrt_bindings/tensorrt*.so: {z.namelist()[:10]}"
            self.strings = printable_strings(z.read(so[0]))
            self.init = init_names(z.read("tensorrt_bindings/__init__.py").decode())
        self.idents = {s for s in self.strings if IDENT.fullmatch(s)}
        self.wheel = wheel.name

    def has(self, name: str) -> bool:
        return name in self.strings or name in self.init or any(s.endswith(name) for s in self.idents)


def _wheel(major: int) -> Path | None:
    found = sorted(WHEELS.glob(f"tensorrt_cu*_bindings-{major}.*.whl")) if WHEELS.is_dir() else []
    return found[-1] if found else None


@lru_cache(maxsize=None)
def bindings(major: int) -> Bindings:
    wheel = _wheel(major)
    if wheel is None:
        pytest.skip(f"no TensorRT {major}.x binding wheel in {WHEELS}: run `make install` (it downloads "
                    f"tensorrt-cu12-bindings==10.13.3.9 and tensorrt-cu13-bindings==11.4.0.106)")
    return Bindings(wheel)


# ----------------------------------------------------------------------------------------------------
# The source side
# ----------------------------------------------------------------------------------------------------
def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _trt_rooted(node: ast.AST) -> bool:
    """``trt`` or ``trt.a.b``: a chain of attributes on the TensorRT module."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "trt"


def _trt_object(node: ast.AST) -> bool:
    """A variable (or ``self._name``) that holds a TensorRT object by the naming convention."""
    if isinstance(node, ast.Name):
        return node.id in TRT_OBJECT_NAMES
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            and node.attr.lstrip("_") in TRT_OBJECT_NAMES)


def source_trt_names(paths) -> dict[str, list[str]]:
    """TensorRT names used in ``paths`` -> where (file:line)."""
    used: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and (_trt_rooted(node.value) or _trt_object(node.value)):
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                  and (_trt_rooted(node.args[0]) or _trt_object(node.args[0]))
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            if name is not None:
                used.setdefault(name, []).append(f"{_rel(path)}:{node.lineno}")
    return used


def all_attribute_names(paths) -> dict[str, list[str]]:
    """Every attribute name read anywhere in ``paths`` (any object), plus getattr-family strings."""
    out: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            if name is not None:
                out.setdefault(name, []).append(f"{_rel(path)}:{node.lineno}")
    return out


TRT_PATHS = [REPO / m for m in TRT_MODULES]
ENGINES_PATHS = sorted((REPO / "engines").glob("*.py"))


# ----------------------------------------------------------------------------------------------------
# Tests that need no wheel
# ----------------------------------------------------------------------------------------------------
def test_trt_modules_exist():
    for p in TRT_PATHS:
        assert p.is_file(), p


def test_source_uses_exactly_the_listed_names():
    used = source_trt_names(TRT_PATHS)
    unlisted = {n: w for n, w in used.items() if n not in TRT_NAMES_USED}
    assert not unlisted, f"TensorRT names used but missing from TRT_NAMES_USED (add them, the wheels check them): {unlisted}"
    stale = sorted(TRT_NAMES_USED - set(used))
    assert not stale, f"TRT_NAMES_USED lists names the source no longer uses: {stale}"


def test_forbidden_names_never_used_in_engines():
    attrs = all_attribute_names(ENGINES_PATHS)
    hits = {n: attrs[n] for n in TRT_NAMES_FORBIDDEN if n in attrs}
    assert not hits, f"removed/forbidden TensorRT names used (precision belongs to the ONNX graph): {hits}"
    assert TRT_NAMES_REMOVED_IN_11 >= {"FP16", "INT8", "int8_calibrator"}
    assert not (TRT_NAMES_USED & TRT_NAMES_FORBIDDEN)


def test_the_only_builder_flag_is_tf32_and_it_is_cleared():
    """Precision belongs to the ONNX graph: the one builder flag the code touches is TF32, cleared."""
    seen = []
    for path in TRT_PATHS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "BuilderFlag":
                seen.append(node.lineno)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_flag"):
                assert node.func.attr == "clear_flag", f"{path.name}:{node.lineno}: {node.func.attr}"
                (arg,) = node.args
                assert ast.unparse(arg) == "trt.BuilderFlag.TF32", f"{path.name}:{node.lineno}: {ast.unparse(arg)}"
    assert len(seen) == 1


def test_no_hardcoded_network_flag_bit():
    # 1 << 0, 1 << 1, ... as a create_network argument would encode an enum value that changes between
    # releases; the flag must come from the enum.
    for path in TRT_PATHS:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "create_network"):
                for arg in node.args:
                    assert not isinstance(arg, (ast.Constant, ast.BinOp)), \
                        f"{path.name}:{node.lineno}: create_network gets a literal; use network_creation_flags(trt)"


def test_ast_collector_sees_names_in_a_sample(tmp_path):
    import textwrap

    sample = tmp_path / "trt_names_sample.py"
    sample.write_text(textwrap.dedent("""
        def f(trt, builder, other):
            config = builder.create_builder_config()
            config.set_flag(trt.BuilderFlag.FP16)
            other.not_trt()
            getattr(trt, "int8_calibrator")
            self._engine.num_io_tensors
    """))
    used = source_trt_names([sample])
    assert {"create_builder_config", "set_flag", "BuilderFlag", "FP16", "int8_calibrator", "num_io_tensors"} <= set(used)
    assert "not_trt" not in used


# ----------------------------------------------------------------------------------------------------
# Against the wheels
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("major", [10, 11])
def test_every_used_name_exists(major):
    b = bindings(major)
    needed = {n for n in TRT_NAMES_USED if major in TRT_NAMES_VERSION_GATED.get(n, (major,))}
    missing = sorted(n for n in needed if not b.has(n))
    assert not missing, f"{b.wheel} lacks {missing}"


def test_version_gated_names_exist_where_used():
    for name, majors in TRT_NAMES_VERSION_GATED.items():
        assert name in TRT_NAMES_USED
        for major in majors:
            assert bindings(major).has(name), (name, major)


def test_reader_detects_removed_names():
    # The check has teeth: names removed in 11 are found in 10's module and not in 11's.
    b10, b11 = bindings(10), bindings(11)
    for name in REMOVED_DETECTABLE:
        assert name in TRT_NAMES_REMOVED_IN_11
        assert b10.has(name), f"{name} should exist in {b10.wheel}"
        assert not b11.has(name), f"{name} should be gone from {b11.wheel}"
    assert not b10.has("create_network_with_a_name_that_does_not_exist")
