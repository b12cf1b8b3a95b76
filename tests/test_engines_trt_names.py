"""Every TensorRT name the engines code uses, or Polygraphy's loaders use on its behalf, exists in TensorRT 10.13
and 11.4; removed names are never used; every engine is built by one function.

TensorRT cannot be installed here, so the check is static. ``make install`` downloads the binding
wheels ``tensorrt-cu12-bindings==10.13.3.9`` and ``tensorrt-cu13-bindings==11.4.0.106`` into
``.cache/tensorrt-bindings/``; this test opens them with zipfile (no install), reads the printable
strings of the compiled ``tensorrt.so`` (like binutils' ``strings``) plus the names its ``__init__.py``
defines, and looks up every name in ``engines.trt_compat.TRT_NAMES_USED`` and ``TRT_NAMES_VIA_POLYGRAPHY``
(the names Polygraphy's loaders read for the build, recorded by tests/test_build.py against a stand-in).

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
                                TRT_NAMES_VERSION_GATED, TRT_NAMES_VIA_POLYGRAPHY, TRT_NAMES_VIA_POLYGRAPHY_10_ONLY,
                                TRT_OBJECT_NAMES)

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


def test_our_code_sets_no_builder_flag():
    """Precision belongs to the ONNX graph: our code touches no builder flag; the one flag Polygraphy's CreateConfig
    touches for us is TF32 (cleared, or set with --tf32), which tests/test_build.py records."""
    for path in TRT_PATHS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr != "BuilderFlag" and not node.attr.endswith("_flag"), f"{_rel(path)}:{node.lineno}"


# Polygraphy's loaders that make a TensorRT network, builder config or engine (classes and their function forms).
BUILD_LOADERS = ("CreateNetwork", "NetworkFromOnnxPath", "NetworkFromOnnxBytes", "CreateConfig", "EngineFromNetwork",
                 "EngineBytesFromNetwork", "create_network", "network_from_onnx_path", "network_from_onnx_bytes",
                 "create_config", "engine_from_network", "engine_bytes_from_network")
CREATE_CONFIG_KEYWORDS = {"tf32", "profiles", "memory_pool_limits", "builder_optimization_level"}
STAGE_PACKAGES = ("t2t_vit", "train", "export", "calibration", "engines", "evaluation")


def _imports_and_calls(tree: ast.AST, names) -> dict[str, list[int]]:
    """Function name -> lines where it imports or calls one of ``names`` (module level counts as ``<module>``)."""
    out: dict[str, list[int]] = {}

    def visit(node: ast.AST, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if (isinstance(child, ast.alias) and child.name in names or isinstance(child, ast.Call)
                    and isinstance(child.func, (ast.Name, ast.Attribute))
                    and (getattr(child.func, "id", None) or getattr(child.func, "attr", None)) in names):
                out.setdefault(fn, []).append(getattr(child, "lineno", 0))
            visit(child, inner)

    visit(tree, "<module>")
    return out


def test_one_engine_path():
    """Every engine is built by engines.build.build_serialized_engine: no other function in the stage packages
    imports or calls Polygraphy's network/config/engine loaders, or builds with TensorRT's Builder directly."""
    hits = {}
    for package in STAGE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for fn, lines in _imports_and_calls(tree, BUILD_LOADERS + ("build_serialized_network",)).items():
                hits[f"{_rel(path)}:{fn}"] = lines
    assert set(hits) == {"engines/build.py:build_serialized_engine"}, hits


def test_build_loader_options():
    """What build_serialized_engine asks of Polygraphy: a strongly typed network by the version check (a literal
    True would set the creation flag 11.x deprecates), and no precision flag, calibrator or precision constraint."""
    tree = ast.parse((REPO / "engines" / "build.py").read_text())
    calls = {node.func.id: node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BUILD_LOADERS}
    assert set(calls) == {"NetworkFromOnnxPath", "CreateConfig", "EngineBytesFromNetwork"}
    strongly = {k.arg: k.value for k in calls["NetworkFromOnnxPath"].keywords}["strongly_typed"]
    assert ast.unparse(strongly) == "bool(flags)", ast.unparse(strongly)
    config = {k.arg: k.value for k in calls["CreateConfig"].keywords}
    assert set(config) == CREATE_CONFIG_KEYWORDS and ast.unparse(config["tf32"]) == "settings.tf32"


def test_one_engine_path_checker_sees_other_builders(tmp_path):
    import textwrap

    sample = ast.parse(textwrap.dedent("""
        from polygraphy.backend.trt import EngineFromNetwork
        def build(trt, path):
            from polygraphy.backend.trt import NetworkFromOnnxPath
            return trt.Builder(None).build_serialized_network(NetworkFromOnnxPath(path), None)
        def harmless():
            return 1
    """))
    hits = _imports_and_calls(sample, BUILD_LOADERS + ("build_serialized_network",))
    assert set(hits) == {"<module>", "build"} and len(hits["build"]) == 3


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


@pytest.mark.parametrize("major", [10, 11])
def test_every_name_polygraphy_reads_for_us_exists(major):
    """The names Polygraphy's loaders read on the build path (recorded by tests/test_build.py): all exist in both
    majors, except the few 11.x removed, which Polygraphy reads only under an AttributeError guard."""
    b = bindings(major)
    needed = TRT_NAMES_VIA_POLYGRAPHY - (TRT_NAMES_VIA_POLYGRAPHY_10_ONLY if major >= 11 else set())
    missing = sorted(n for n in needed if not b.has(n))
    assert not missing, f"{b.wheel} lacks {missing}"
    if major >= 11:
        present = sorted(n for n in TRT_NAMES_VIA_POLYGRAPHY_10_ONLY if b.has(n))
        assert not present, f"{b.wheel} still has {present}: drop them from TRT_NAMES_VIA_POLYGRAPHY_10_ONLY"


def test_polygraphy_touches_no_precision_api_for_us():
    # The forbidden names Polygraphy reads for us are set_flag (TF32 only, with --tf32) and int8_calibrator (read,
    # never assigned: the recording config refuses an assignment); tests/test_build.py checks both.
    assert TRT_NAMES_VIA_POLYGRAPHY & TRT_NAMES_FORBIDDEN == {"set_flag", "int8_calibrator"}
    assert TRT_NAMES_VIA_POLYGRAPHY_10_ONLY <= TRT_NAMES_VIA_POLYGRAPHY


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
