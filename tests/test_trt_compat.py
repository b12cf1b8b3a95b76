"""engines.trt_compat: the strongly typed flag per TensorRT version (fake ``trt`` module objects stand in
for 10.x/11.x to check our choice, not TensorRT), version parsing, the not-installed error."""
from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import pytest

from engines import trt_compat as C
from tests.engine_helpers import (INSTALL, no_trt)


# ----------------------------------------------------------------------------------------------------
# trt_compat
# ----------------------------------------------------------------------------------------------------
def fake_trt(version: str, strongly_typed_value: int | None):
    """A module-like object with just what network_creation_flags reads."""
    members = {"EXPLICIT_BATCH": 0} if strongly_typed_value is None else {"STRONGLY_TYPED": strongly_typed_value}
    return types.SimpleNamespace(__version__=version,
                                 NetworkDefinitionCreationFlag=enum.IntEnum("NetworkDefinitionCreationFlag", members))


@pytest.mark.parametrize("value", [0, 1, 5])
def test_strongly_typed_flag_on_10_comes_from_the_enum(value):
    assert C.network_creation_flags(fake_trt("10.13.3.9", value)) == 1 << value


@pytest.mark.parametrize("version,value", [("11.4.0.106", 1), ("11.0.0", None)])
def test_strongly_typed_is_default_on_11(version, value):
    # 11 keeps a deprecated, ignored STRONGLY_TYPED member (or none at all): no flag is passed either way.
    assert C.network_creation_flags(fake_trt(version, value)) == 0


def test_missing_flag_on_old_tensorrt_is_an_error():
    with pytest.raises(C.TensorRTUnavailable, match="STRONGLY_TYPED"):
        C.network_creation_flags(fake_trt("9.0.1", None))


@pytest.mark.parametrize("text,expect", [("10.13.3.9", (10, 13, 3, 9)), ("11.4.0.106", (11, 4, 0, 106)),
                                         ("10.1.0.post12.dev1", (10, 1, 0, 12)), ("8.6.1", (8, 6, 1))])
def test_parse_version(text, expect):
    assert C.parse_version(text) == expect


@no_trt
def test_import_tensorrt_names_what_to_install():
    with pytest.raises(C.TensorRTUnavailable, match=r"pip install -e '\.\[tensorrt\]'"):
        C.import_tensorrt()
    ok, why = C.tensorrt_availability()
    assert not ok and INSTALL in why


def test_import_tensorrt_rejects_too_old(monkeypatch):
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "8.6.1"
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    with pytest.raises(C.TensorRTUnavailable, match="too old"):
        C.import_tensorrt(need_gpu=False)
    mod.__version__ = "10.13.3.9"
    assert C.import_tensorrt(need_gpu=False) is mod
