"""Atomic result files and the host description of every report and sidecar (shared with every stage:
the implementations live in :mod:`t2t_vit.files` and :mod:`t2t_vit.env`)."""
from __future__ import annotations

from t2t_vit.env import host_info
from t2t_vit.files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "host_info"]
