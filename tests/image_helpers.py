"""Tiny image folders for tests: seeded uniform noise, one sub-folder per class (ImageFolder layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TWO_WNIDS = ("n01440764", "n02102040")  # tench, English springer: two Imagenette classes


def noise_images(root: Path, classes=TWO_WNIDS, per_class: int = 3, size: int = 48, suffix: str = ".png") -> Path:
    """``root/<class>/<i><suffix>``: ``per_class`` RGB ``size`` x ``size`` noise images per class, drawn from
    ``np.random.default_rng(0)`` (the same pixels on every call; ``.JPEG``, Imagenette's, is lossy); returns
    ``root``."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}{suffix}")
    return root
