"""Tiny image folders for tests: seeded uniform noise, one sub-folder per class (ImageFolder layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TWO_WNIDS = ("n01440764", "n02102040")  # tench, English springer: two Imagenette classes


def noise_images(root: Path, classes=TWO_WNIDS, per_class: int = 3, size: int = 48, name: str = "{i}.png") -> Path:
    """``root/<class>/<name>``: ``per_class`` RGB ``size`` x ``size`` noise images per class, drawn from
    ``np.random.default_rng(0)`` (the same pixels on every call); ``name`` is formatted with the class ``c``
    and the index ``i``, and its suffix picks the format (``.jpg``/``.JPEG`` are lossy); returns ``root``."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            image.save(root / c / name.format(c=c, i=i))
    return root
