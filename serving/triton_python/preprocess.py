"""Triton Python-backend model: encoded image bytes -> the classifier's input tensor.

Copied as ``<model>-preprocess/1/model.py`` into the repository ``make triton`` writes. It must run inside
any Triton container, so it needs only numpy and Pillow (no project code): the eval transform is written
out here with the data config read from the model's ``config.pbtxt`` parameter ``data_config`` (the
artifact's own, recorded at export). It reproduces timm's eval transform on PIL images
(``create_transform(is_training=False)``: bicubic resize of the shorter side to floor(img_size /
crop_pct), center crop, /255, normalize); ``tests/test_triton.py`` checks it against
``DataConfig.eval_transform()``.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image

try:  # present inside Triton's Python backend only; the transform below is importable without it
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton
    pb_utils = None

_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class BadImage(ValueError):
    """The bytes are not a decodable image."""


def transform(data: bytes, cfg: dict) -> np.ndarray:
    """One encoded image -> float32 (3, S, S), exactly as the model's eval transform."""
    if cfg.get("crop_mode", "center") != "center":
        raise ValueError(f"crop_mode {cfg['crop_mode']!r} is not supported (only center)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for bad bytes
        raise BadImage(f"not a decodable image ({type(e).__name__}: {e})") from None
    size = int(cfg["img_size"])
    short = int(math.floor(size / float(cfg["crop_pct"])))
    w, h = img.size
    # torchvision's Resize(int) on a PIL image: the shorter side becomes `short`, the other keeps the ratio.
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), _FILTERS[cfg.get("interpolation", "bicubic")])
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg["std"], dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def _config_value(model_config: dict, key: str) -> str:
    return model_config["parameters"][key]["string_value"]


class TritonPythonModel:  # pragma: no cover - runs inside Triton
    """Triton's Python-backend interface: one response per request, an error response per bad image."""

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.cfg = json.loads(_config_value(model_config, "data_config"))
        self.out_dtype = np.dtype(_config_value(model_config, "output_dtype"))
        self.in_name = model_config["input"][0]["name"]
        self.out_name = model_config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            blobs = pb_utils.get_input_tensor_by_name(request, self.in_name).as_numpy().reshape(-1)
            try:
                batch = np.stack([transform(bytes(b), self.cfg) for b in blobs]).astype(self.out_dtype)
            except (BadImage, ValueError) as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, batch)]))
        return responses
