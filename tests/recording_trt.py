"""A recording stand-in for the ``tensorrt`` module, for running the engine build (our code and Polygraphy's real
TensorRT loaders) where TensorRT cannot be installed. It produces no engine.

Faithful by construction rather than by hope:

* every public attribute read on the module, its classes, enums and objects is recorded (``Recorder.names``),
  so a test can hold the names Polygraphy reads on our behalf to ``engines.trt_compat.TRT_NAMES_VIA_POLYGRAPHY``,
  which the names test checks against the real 10.13 and 11.4 bindings;
* a name the stand-in does not model raises ``AssertionError``, not ``AttributeError``: Polygraphy probes
  optional APIs under ``except AttributeError``, and a missing model must fail the test, not quietly send
  Polygraphy down another path;
* on 11.x, the names TensorRT 11 removed (``REMOVED_IN_11``, each checked absent from the 11.4 wheel by
  ``tests/test_engines_trt_names.py``) raise ``AttributeError`` as they would, so Polygraphy's fallbacks run.

``install(monkeypatch, trt)`` points Polygraphy's lazily imported ``tensorrt`` (one ``LazyModule`` per
Polygraphy module) at the stand-in for one test.
"""
from __future__ import annotations

import enum
import sys
from typing import Any, Callable

# Names of the build path that TensorRT 11 removed; Polygraphy only probes them (reads under
# ``except AttributeError`` / ``hasattr``), never to set anything.
REMOVED_IN_11 = frozenset({"int8_calibrator", "QuantizationFlag", "get_quantization_flag", "precision_is_set"})
_SETTABLE = frozenset({"builder_optimization_level", "profiling_verbosity"})


def _public(name: str) -> bool:
    return not name.startswith("_") or name in ("__version__", "__members__")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []   # method calls (and attribute sets) with their arguments
        self.names: set[str] = set()   # every public TensorRT attribute read (or set)
        self.missing: set[str] = set()  # reads of names this version lacks (AttributeError raised)


def make_recording_trt(rec: Recorder, version: str = "10.13.3.9", input_name: str = "input",
                       serialized: bytes | None = b"FAKE-ENGINE", timings: str = "T1",
                       during_build: Callable[[], None] | None = None, parse_errors: tuple[str, ...] = ()) -> Any:
    """A ``tensorrt`` module for one build: a network ``input -> pooled -> logits`` (two layers)."""
    major = int(version.split(".")[0])
    removed = REMOVED_IN_11 if major >= 11 else frozenset()

    def missing(owner: str, name: str) -> AttributeError:
        if name in removed:
            rec.missing.add(name)
            return AttributeError(f"'{owner}' has no attribute '{name}' (removed in TensorRT 11)")
        raise AssertionError(f"unexpected TensorRT API use: {owner}.{name} (model it in tests/recording_trt.py "
                             f"after checking Polygraphy's source and both binding wheels)")

    class Meta(type):
        def __getattribute__(cls, name):
            if _public(name):
                rec.names.add(name)
            return super().__getattribute__(name)

        def __getattr__(cls, name):
            raise missing(cls.__name__, name)

    class EnumMeta(enum.EnumMeta):
        def __getattribute__(cls, name):
            if _public(name):
                rec.names.add(name)
            return super().__getattribute__(name)

    class Obj(metaclass=Meta):
        def __getattribute__(self, name):
            if _public(name):
                rec.names.add(name)
            return object.__getattribute__(self, name)

        def __getattr__(self, name):
            raise missing(type(self).__name__, name)

    # -- enums (members are only those the path reads, plus FP16/INT8 on 10.x, read by Polygraphy's summary) --
    Flag = _enum(EnumMeta, "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 3})
    BuilderFlag = _enum(EnumMeta, "BuilderFlag", {"TF32": 7} if major >= 11 else {"FP16": 0, "INT8": 1, "TF32": 7})
    MemoryPoolType = _enum(EnumMeta, "MemoryPoolType", {"WORKSPACE": 0})
    DeviceType = _enum(EnumMeta, "DeviceType", {"GPU": 0, "DLA": 1})
    LayerType = _enum(EnumMeta, "LayerType", {"REDUCE": 0, "SHUFFLE": 1, "SHAPE": 2, "CONSTANT": 3, "TRIP_LIMIT": 4,
                                              "ITERATOR": 5, "RECURRENCE": 6, "LOOP_OUTPUT": 7})
    TacticSource = _enum(EnumMeta, "TacticSource", {"CUBLAS": 0, "JIT_CONVOLUTIONS": 4})
    PreviewFeature = _enum(EnumMeta, "PreviewFeature", {"PROFILE_SHARING_0806": 0})
    ProfilingVerbosity = _enum(EnumMeta, "ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    extra = {} if major >= 11 else {"QuantizationFlag": _enum(EnumMeta, "QuantizationFlag",
                                                               {"CALIBRATE_BEFORE_FUSION": 0})}

    class Logger(Obj):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self, severity=2):
            pass

    class ILogger:  # Polygraphy subclasses it (its own CustomTrtLogger)
        def __init__(self):
            pass

    # -- network --------------------------------------------------------------------------------------
    class Tensor(Obj):
        def __init__(self, name, is_output=False):
            self._name, self._output = name, is_output

        name = property(lambda self: self._name)
        shape = property(lambda self: (-1, 3, 64, 64) if self._name == input_name else (-1, 3))
        dtype = property(lambda self: "DataType.FLOAT")
        is_shape_tensor = property(lambda self: False)
        is_network_output = property(lambda self: self._output)

    class Layer(Obj):
        def __init__(self, kind, inputs, outputs):
            self._type, self._in, self._out = kind, inputs, outputs

        type = property(lambda self: self._type)
        num_inputs = property(lambda self: len(self._in))
        num_outputs = property(lambda self: len(self._out))

        def get_input(self, i):
            return self._in[i]

        def get_output(self, i):
            return self._out[i]

    if major < 11:
        Layer.precision_is_set = property(lambda self: False)

    class Network(Obj):
        def __init__(self, flags):
            self._flags = flags
            self._tensors = [Tensor(input_name), Tensor("pooled"), Tensor("logits", is_output=True)]
            t = self._tensors
            self._layers = [Layer(LayerType["REDUCE"], [t[0]], [t[1]]), Layer(LayerType["SHUFFLE"], [t[1]], [t[2]])]

        num_inputs = property(lambda self: 1)

        def get_input(self, i):
            return self._tensors[0]

        def get_flag(self, flag):
            return bool(self._flags & (1 << int(flag)))

        def __len__(self):
            return len(self._layers)

        def __getitem__(self, i):
            return self._layers[i]  # IndexError ends `for layer in network`, as in the bindings

        def mark_output(self, tensor):
            rec.calls.append(("mark_output", tensor._name))
            tensor._output = True

        def unmark_output(self, tensor):
            rec.calls.append(("unmark_output", tensor._name))
            tensor._output = False

    class Parser(Obj):
        def __init__(self, network, logger):
            rec.calls.append(("OnnxParser",))

        num_errors = property(lambda self: len(parse_errors))

        def get_error(self, i):
            return parse_errors[i]

        def parse_from_file(self, path):
            rec.calls.append(("parse_from_file", path))
            return not parse_errors

    # -- builder config, profile, timing cache ------------------------------------------------------------
    class Profile(Obj):
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

    class TimingCache(Obj):
        """A timing cache as a set of entries, serialized as sorted entries joined by '+'. One made from bytes
        holding ``FOREIGN`` stands for a cache from another TensorRT version or GPU: TensorRT refuses to attach
        it (``set_timing_cache(..., False)`` is False) or to combine it without ``ignore_mismatch``."""

        def __init__(self, data: bytes):
            self._entries = set(bytes(data).decode().split("+")) - {""}
            self._foreign = b"FOREIGN" in bytes(data)

        def serialize(self):
            return "+".join(sorted(self._entries)).encode()

        def combine(self, other, ignore_mismatch):
            rec.calls.append(("combine", ignore_mismatch))
            if (self._foreign or other._foreign) and not ignore_mismatch:
                return False
            self._entries |= other._entries
            return True

    class Config(Obj):
        def __init__(self):
            object.__setattr__(self, "_cache", None)
            object.__setattr__(self, "_flags", {f: True for f in ("TF32",)})
            object.__setattr__(self, "_profiles", 0)
            object.__setattr__(self, "_pools", {})

        def __setattr__(self, name, value):
            if name not in _SETTABLE:
                raise AssertionError(f"unexpected TensorRT config attribute set: {name} = {value!r}")
            rec.names.add(name)
            rec.calls.append(("set", name, getattr(value, "name", value)))
            object.__setattr__(self, "_" + name, value)

        profiling_verbosity = property(lambda self: self._profiling_verbosity)
        DLA_core = property(lambda self: -1)
        default_device_type = property(lambda self: DeviceType["GPU"])
        engine_capability = property(lambda self: "EngineCapability.STANDARD")
        num_optimization_profiles = property(lambda self: self._profiles)

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("set_memory_pool_limit", pool.name, size))
            self._pools[pool.name] = size

        def get_memory_pool_limit(self, pool):
            return self._pools.get(pool.name, 1 << 40)

        def get_tactic_sources(self):
            return 0b11111

        def get_preview_feature(self, feature):
            return False

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_optimization_profile",))
            object.__setattr__(self, "_profiles", self._profiles + 1)

        def set_flag(self, flag):
            rec.calls.append(("set_flag", flag.name))
            self._flags[flag.name] = True

        def clear_flag(self, flag):
            rec.calls.append(("clear_flag", flag.name))
            self._flags[flag.name] = False

        def get_flag(self, flag):
            return self._flags.get(flag.name, False)

        def create_timing_cache(self, data):
            rec.calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_timing_cache", ignore_mismatch))
            if cache._foreign and not ignore_mismatch:
                return False
            object.__setattr__(self, "_cache", cache)
            return True

        def get_timing_cache(self):
            return TimingCache(self._cache.serialize() + b"+" + timings.encode())

    if major < 11:
        Config.int8_calibrator = property(lambda self: None)  # read by Polygraphy, never set
        Config.get_quantization_flag = lambda self, flag: False

    class Builder(Obj):
        def __init__(self, logger):
            object.__setattr__(self, "_logger", logger)

        def create_network(self, flags=0):
            rec.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build_serialized_network",))
            self._logger.log(Logger.WARNING, "a builder warning, through Polygraphy's logger")
            if during_build:
                during_build()
            return serialized

    def init_libnvinfer_plugins(logger, namespace):
        rec.calls.append(("init_libnvinfer_plugins", namespace))
        return True

    class Module(Obj):
        _is_recording_trt = True

    trt = Module()
    attrs = dict(__version__=version, NetworkDefinitionCreationFlag=Flag, BuilderFlag=BuilderFlag,
                 MemoryPoolType=MemoryPoolType, DeviceType=DeviceType, LayerType=LayerType, TacticSource=TacticSource,
                 PreviewFeature=PreviewFeature, ProfilingVerbosity=ProfilingVerbosity, Logger=Logger,
                 ILogger=ILogger, Builder=Builder, OnnxParser=Parser, init_libnvinfer_plugins=init_libnvinfer_plugins,
                 **extra)
    for k, v in attrs.items():
        object.__setattr__(trt, k, v)
    return trt


def _enum(meta: type, name: str, members: dict[str, int]) -> Any:
    """An IntEnum whose attribute reads are recorded (``meta``: the recording enum metaclass)."""
    return meta(name, (enum.IntEnum,), _members(meta, name, members))


def _members(meta: type, name: str, members: dict[str, int]) -> Any:
    ns = meta.__prepare__(name, (enum.IntEnum,))
    for k, v in members.items():
        ns[k] = v
    return ns


def install(monkeypatch: Any, trt: Any) -> None:
    """Point every Polygraphy module's lazily imported ``tensorrt`` at ``trt`` for this test."""
    import polygraphy.backend.trt  # noqa: F401  (loads the loader, config, profile and util modules)
    from polygraphy.backend.trt import util as trt_util

    for name, module in list(sys.modules.items()):
        current = getattr(module, "trt", None)
        if name.startswith("polygraphy") and (type(current).__name__ == "LazyModule"
                                              or getattr(type(current), "_is_recording_trt", False)):
            monkeypatch.setattr(module, "trt", trt)
    monkeypatch.setattr(trt_util, "TRT_LOGGER", None)  # its logger subclasses trt.ILogger: make it anew
