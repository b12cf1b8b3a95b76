"""The export's precision recipe: one frozen object, written into every exported graph and read back.

:class:`ExportSettings` holds every choice that decides how :func:`export.to_onnx.export_onnx` writes a graph
(opset, exporter, the TensorRT-friendly patterns and the soft splits' form, the class-token-only last block,
and, for the fp16 graph, the Performer's fp32 core, the LayerNorm precision and fp16 I/O). One object is
used for a whole export (the fp32 and the fp16 graph of ``make onnx``); fields marked *fp16 only* leave the
fp32 graph as it is, but are recorded in it too, because later stages start from the fp32 graph and build
their own reduced-precision graphs after the same recipe (``make calib``'s int8 graph keeps the fp32
Performer core and the LayerNorm precision the export chose).

The recipe travels as one metadata key, :data:`METADATA_KEY` (JSON), next to the model's
:class:`t2t_vit.data.DataConfig`::

    settings = ExportSettings(layernorm="fp16")
    export_onnx(model, path, "fp16", settings=settings)
    ExportSettings.from_metadata(t2t_vit.graphs.read_metadata(path)) == settings  # True
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from t2t_vit.errors import T2TError

from .patterns import DEFAULT_SOFT_SPLIT, LAYERNORM_PRECISIONS, SOFT_SPLIT_FORMS

__all__ = [
    "DEFAULT_EXPORTER",
    "DEFAULT_LAYERNORM",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "MAX_OPSET",
    "METADATA_KEY",
    "MIN_OPSET",
    "ExportError",
    "ExportSettings",
]

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 23
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
# LayerNorm precision in the fp16 (and TensorRT int8) graph: fp32 behind Casts. On the reference checkpoint an
# fp16 LayerNorm cost no measurable accuracy, but the final LayerNorm's margin to fp16's range was small: the
# margin, not the accuracy, decides (docs/precision.md, reports/precision-layernorm-t2t_vit_7.md).
# --layernorm-precision fp16 opts out.
DEFAULT_LAYERNORM = "fp32"
METADATA_KEY = "export_settings"


class ExportError(T2TError, RuntimeError):
    """Export failed or cannot start; the message says how to fix it."""


@dataclass(frozen=True)
class ExportSettings:
    """How a graph is written (docs/export.md explains each default).

    Attributes:
        opset: ONNX opset, 17..23 (LayerNormalization needs >= 17).
        exporter: "torchscript" or "dynamo" (torch.export-based).
        patterns: the TensorRT-friendly swaps (False: the plain export, the benchmark baseline).
        soft_split: the soft splits' one-hot Conv, "grouped" or "conv" (dense); with ``patterns``.
        cls_only_last_block: the last block computes the class token only (same logits, fewer multiply-adds).
        fp32_core: fp16 only: the Performer's linear-attention core stays float32 (the fp32 island).
        layernorm: fp16 only: LayerNorms compute in "fp32" behind Casts, or in "fp16".
        fp16_io: fp16 only: float16 graph input and output instead of float32.
        simplify: fold constants and simplify with onnxslim.
    """

    opset: int = DEFAULT_OPSET
    exporter: str = DEFAULT_EXPORTER
    patterns: bool = True
    soft_split: str = DEFAULT_SOFT_SPLIT
    cls_only_last_block: bool = False
    fp32_core: bool = True
    layernorm: str = DEFAULT_LAYERNORM
    fp16_io: bool = False
    simplify: bool = True

    def validate(self) -> "ExportSettings":
        """Raise :class:`ExportError` naming the flag of the first bad field; returns ``self``."""
        if not MIN_OPSET <= int(self.opset) <= MAX_OPSET:
            raise ExportError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (LayerNormalization needs >= 17), "
                              f"got {self.opset}")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"--exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.soft_split not in SOFT_SPLIT_FORMS:
            raise ExportError(f"--soft-split must be one of {SOFT_SPLIT_FORMS}, got {self.soft_split!r}")
        if self.layernorm not in LAYERNORM_PRECISIONS:
            raise ExportError(f"--layernorm-precision must be one of {LAYERNORM_PRECISIONS}, got {self.layernorm!r}")
        return self

    def replace(self, **changes: Any) -> "ExportSettings":
        """A copy with ``changes`` (e.g. the export report's contrast graph: ``fp32_core=False``)."""
        return replace(self, **changes)

    def to_metadata(self) -> dict[str, str]:
        """The one metadata entry that records this recipe: ``{METADATA_KEY: JSON}``."""
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str = "the ONNX graph") -> "ExportSettings":
        """The recipe recorded by :meth:`to_metadata`; fields a newer export added and this one lacks take
        their defaults (which are the behaviour before the field existed).

        Raises:
            ExportError: no recipe in ``meta`` (a graph exported before it was recorded), or an unreadable one;
                the message names ``make onnx``.
        """
        raw = meta.get(METADATA_KEY)
        if raw is None:
            raise ExportError(f"{source} has no {METADATA_KEY!r} metadata (exported by an older version, which did "
                              f"not record its precision recipe); re-export it with `make onnx`")
        try:
            values = json.loads(raw)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            return cls(**values).validate()
        except (ValueError, TypeError, ExportError) as e:
            raise ExportError(f"{source}: unreadable {METADATA_KEY!r} metadata ({e}); re-export it with "
                              f"`make onnx`") from e
