"""One checkpoint loader for every stage and command-line tool.

Reads, without conversion:

* the authors' released ImageNet files (``<acc>_T2T_ViT_<n>.pth.tar``: a dict whose ``state_dict_ema``
  holds the weights) and files written by their training script (timm ``CheckpointSaver``: also
  ``state_dict``, ``optimizer``, ``epoch``, ``arch`` and an ``argparse.Namespace`` under ``args``);
* the authors' CIFAR fine-tunes (``{'net': {'module.' + key: ...}, 'acc', 'epoch'}``);
* this project's training checkpoints (``state_dict`` / ``state_dict_ema`` plus plain-data metadata);
* ``.safetensors`` files and bare state dicts.

Pickles are opened with ``torch.load(weights_only=True)``. The only non-tensor class allowed is
``argparse.Namespace`` (``ALLOWED_GLOBALS``), which the authors' training script stores; anything else
is refused with an explanation rather than executed.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import T2TError
from .layers import sinusoid_table
from .model import ARCHS, TEST_MODELS, ModelConfigError, T2TViT, check_img_size

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ALLOWED_GLOBALS",
    "read_checkpoint",
    "extract_state_dict",
    "load_checkpoint",
    "build_model",
    "suggest_models",
    "WEIGHTS",
    "preferred_weights",
    "loaded_weights",
    "recorded_img_size",
    "resize_pos_embed",
    "trained_like_",
]

# Classes a checkpoint may contain besides tensors and plain containers. argparse.Namespace is what
# the authors' (timm) training script stores under "args"; it holds only plain values.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Keys holding weights, in order of preference. EMA weights first: the authors evaluate with them.
STATE_DICT_KEYS = ("state_dict_ema", "state_dict", "model_ema", "model", "net")

# Keys that legitimately differ between a checkpoint and a model built with another class count or
# image size; handled by load_checkpoint rather than reported as errors.
HEAD_KEYS = ("head.weight", "head.bias")
POS_EMBED_KEY = "pos_embed"


class CheckpointError(T2TError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely (no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the path of a .pth, .pth.tar, .pt or .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    kind = _sniff(path)
    if kind is None:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint at all (neither a torch.save zip archive nor a pickle: it starts "
            f"with bytes {path.read_bytes()[:8]!r}); pass the .pth/.pth.tar/.safetensors file written by training "
            f"or released by the authors")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt {kind}?): {e}") from e
        raise CheckpointError(
            f"refusing to unpickle {path}: it contains Python objects beyond tensors and plain data, and "
            f"loading them could run arbitrary code (weights_only=True). Details: {e}. "
            f"If you trust the file, re-save only its weights: "
            f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth'), "
            f"or convert it to .safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def _sniff(path: Path) -> str | None:
    """``"zip archive"`` (torch.save's format since 1.6), ``"legacy pickle"`` (protocol 2+), or None."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "legacy pickle"
    return None


WEIGHTS = ("ema", "model")


def preferred_weights(obj: Any, weights: str | None = None) -> str:
    """Which weights to load: ``weights`` when given, else the checkpoint's own record (this project's
    training stores the better of its EMA and raw weights under ``"weights"``), else "ema"."""
    if weights is None and isinstance(obj, Mapping) and obj.get("weights") in WEIGHTS:
        weights = str(obj["weights"])
    weights = weights or "ema"
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    return weights


def extract_state_dict(obj: Any, weights: str | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Pick the weights out of a checkpoint dict and strip ``module.`` prefixes (DDP/DataParallel).

    ``weights``: "ema" prefers the EMA weights when the checkpoint has them, "model" never takes them,
    None follows :func:`preferred_weights`.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    sd: Any = obj
    use_ema = preferred_weights(obj, weights) == "ema"
    keys = STATE_DICT_KEYS if use_ema else tuple(k for k in STATE_DICT_KEYS if "ema" not in k)
    for key in keys:
        if isinstance(obj.get(key), Mapping) and obj[key]:
            sd = obj[key]
            break
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    if not out:
        raise CheckpointError(
            f"no weights found in checkpoint (top-level keys: {sorted(map(str, obj))[:12]}); expected one of "
            f"{STATE_DICT_KEYS} or a bare state dict"
        )
    return out


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def suggest_models(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models whose architecture fits these weights (head and pos_embed sizes ignored)."""
    ckpt = {k: s for k, s in _shapes(sd).items() if k not in HEAD_KEYS + (POS_EMBED_KEY,)}
    fits = []
    for name, arch in ARCHS.items():
        with torch.device("meta"):
            ref = T2TViT(img_size=32 if name in TEST_MODELS else 224, num_classes=10, **arch).state_dict()
        ref_shapes = {k: s for k, s in _shapes(ref).items() if k not in HEAD_KEYS + (POS_EMBED_KEY,)}
        if ref_shapes == ckpt:
            fits.append(name)
    return fits


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def resize_pos_embed(sd: "OrderedDict[str, torch.Tensor]", own: torch.Tensor) -> str:
    """Fit the checkpoint's ``pos_embed`` in ``sd`` to a model whose table is ``own`` (another token count).

    T2T-ViT's position table is fixed: row ``i`` is the sinusoid of the raster index ``i`` (0 = the class
    token), never trained. When the checkpoint's table is that sinusoid (to 1e-4), it is dropped from ``sd``
    and the model keeps the table it built for its own grid, exactly what a model trained at that size
    holds: returns ``"rebuilt"``. Any other table carries information the sinusoid cannot rebuild; it is
    resampled bicubically on its 2-D grid, class token kept (timm ``resample_abs_pos_embed``, the
    transfer-learning rule of the authors' code), and written back into ``sd``: returns ``"resampled"``.
    """
    from timm.layers import resample_abs_pos_embed

    old = sd[POS_EMBED_KEY]
    n_old, n_new, dim = old.shape[1], own.shape[1], own.shape[-1]
    if torch.allclose(old.float(), sinusoid_table(n_old, dim), atol=1e-4, rtol=0):
        sd.pop(POS_EMBED_KEY)
        return "rebuilt"
    side_old, side_new = math.isqrt(n_old - 1), math.isqrt(n_new - 1)
    if side_old * side_old != n_old - 1 or side_new * side_new != n_new - 1:
        raise CheckpointError(f"pos_embed of {n_old} rows is not a class token plus a square grid; cannot fit it to "
                              f"{n_new} rows (load the checkpoint at the size it was trained at, --img-size)")
    sd[POS_EMBED_KEY] = resample_abs_pos_embed(old.float(), [side_new, side_new], [side_old, side_old],
                                               num_prefix_tokens=1).to(old.dtype)
    return "resampled"


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    weights: str | None = None) -> dict[str, Any]:
    """Load weights into ``model``; returns a small report of what was adapted.

    * A head of another class count is dropped (transfer learning) and the model's new head kept.
    * A ``pos_embed`` of another length (another ``img_size``): see :func:`resize_pos_embed`. The fixed
      sinusoid table is rebuilt for the model's token count (``rebuilt_pos_embed``); a table that is not
      that sinusoid (learned, or interpolated by another code base) is resampled on its 2-D grid
      (``resampled_pos_embed``).
    * Anything else that does not match raises one :class:`CheckpointError` listing missing keys,
      unexpected keys and shape mismatches, and naming the registered models the weights do fit.
    """
    obj = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    sd = extract_state_dict(obj, weights=weights)
    own = model.state_dict()
    report: dict[str, Any] = {"dropped_head": False, "rebuilt_pos_embed": False, "resampled_pos_embed": False}

    if POS_EMBED_KEY in sd and POS_EMBED_KEY in own and sd[POS_EMBED_KEY].shape != own[POS_EMBED_KEY].shape:
        if sd[POS_EMBED_KEY].shape[-1] == own[POS_EMBED_KEY].shape[-1]:
            report["pos_embed_rows"] = [int(sd[POS_EMBED_KEY].shape[1]), int(own[POS_EMBED_KEY].shape[1])]
            how = resize_pos_embed(sd, own[POS_EMBED_KEY])
            report["rebuilt_pos_embed"] = how == "rebuilt"
            report["resampled_pos_embed"] = how == "resampled"
    head_mismatch = [k for k in HEAD_KEYS if k in sd and k in own and sd[k].shape != own[k].shape]
    if head_mismatch and all(sd[k].shape[1:] == own[k].shape[1:] for k in head_mismatch):
        for k in HEAD_KEYS:
            sd.pop(k, None)
        report["dropped_head"] = True

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    allowed_missing = set()
    if report["dropped_head"]:
        allowed_missing |= set(HEAD_KEYS)
    if report["rebuilt_pos_embed"]:
        allowed_missing.add(POS_EMBED_KEY)
    real_missing = [k for k in missing if k not in allowed_missing]

    if mismatched or (strict and (real_missing or unexpected)):
        lines = [f"checkpoint does not fit model {_model_name(model)}:"]
        if real_missing:
            lines.append(f"  missing keys ({len(real_missing)}): {', '.join(real_missing[:10])}" + (" ..." if len(real_missing) > 10 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        for k, a, b in mismatched[:10]:
            lines.append(f"  shape mismatch {k}: checkpoint {a} vs model {b}")
        if len(mismatched) > 10:
            lines.append(f"  ... and {len(mismatched) - 10} more shape mismatches")
        fits = suggest_models(sd)
        if fits:
            lines.append(f"  these weights fit: {', '.join(fits)} (pass --model {fits[0]})")
        else:
            lines.append("  no registered T2T-ViT model fits these weights; is this a T2T-ViT checkpoint?")
        raise CheckpointError("\n".join(lines))

    result = model.load_state_dict(sd, strict=False)
    report["missing"] = [k for k in result.missing_keys if k not in allowed_missing]
    report["unexpected"] = list(result.unexpected_keys)
    return report


def loaded_weights(obj: Any, weights: str | None = None) -> str:
    """What :func:`extract_state_dict` takes from ``obj``: "ema", "model", or "bare" (a plain state dict)."""
    if not isinstance(obj, Mapping):
        return "bare"
    use_ema = preferred_weights(obj, weights) == "ema"
    for key in STATE_DICT_KEYS:
        if (use_ema or "ema" not in key) and isinstance(obj.get(key), Mapping) and obj[key]:
            return "ema" if "ema" in key else "model"
    return "bare"


def checkpoint_meta(obj: Any) -> dict[str, Any]:
    """Plain-data metadata our training checkpoints carry (model name, classes, config); {} otherwise."""
    if isinstance(obj, Mapping):
        meta = obj.get("meta")
        if isinstance(meta, Mapping):
            return dict(meta)
    return {}


def _safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable files were refused by read_checkpoint already; metadata is optional
        return {}


def recorded_img_size(obj: Any, sd: Mapping[str, torch.Tensor], checkpoint: str | os.PathLike | None = None,
                      ) -> tuple[int | None, str | None]:
    """The input size a checkpoint was trained at, and None, when it records one: this project's ``meta``
    or a ``.safetensors`` file's ``img_size`` metadata. Otherwise (a bare state dict, a converted file) the
    size its fixed ``pos_embed`` table implies (one token per 16 x 16 pixels) with the reason, or
    ``(None, reason)`` when it has no such table either."""
    meta = checkpoint_meta(obj)
    if meta.get("img_size"):
        return int(meta["img_size"]), None
    if checkpoint is not None and str(checkpoint).endswith(".safetensors"):
        size = _safetensors_metadata(checkpoint).get("img_size")
        if size and str(size).isdigit():
            return int(size), None
    pe = sd.get(POS_EMBED_KEY)
    if pe is not None and pe.ndim == 3 and pe.shape[1] > 1:
        grid = math.isqrt(pe.shape[1] - 1)
        if grid * grid == pe.shape[1] - 1:
            return 16 * grid, f"its pos_embed holds a {grid}x{grid} token grid (16 px per token)"
    return None, "it has no pos_embed table to infer one from"


def build_model(name: str, checkpoint: str | os.PathLike | None = None, num_classes: int | None = None,
                img_size: int | None = None, strict: bool = True, weights: str | None = None,
                **kwargs: Any) -> nn.Module:
    """Create a registered model and load a checkpoint into it: the one entry point every CLI uses.

    When ``num_classes`` is None and the checkpoint has a head, the model is built with the
    checkpoint's class count, so a 10-class fine-tune loads as a 10-class model. ``img_size`` None
    means the size the checkpoint records (:func:`recorded_img_size`), else the one its ``pos_embed``
    implies, else the registry default; the last two say so in one logged note.
    """
    import timm

    if name.split(".")[0] not in ARCHS:
        raise ModelConfigError(f"unknown model {name!r}; registered T2T-ViT models: {', '.join(ARCHS)}")
    if img_size is not None:
        check_img_size(img_size, "--img-size (IMG_SIZE=)")
    obj = None
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        sd = extract_state_dict(obj, weights=weights)
        if num_classes is None and "head.weight" in sd:
            num_classes = int(sd["head.weight"].shape[0])
        source = "--img-size"
        if img_size is None:
            img_size, why = recorded_img_size(obj, sd, checkpoint)
            source = "checkpoint" if why is None else ("pos_embed" if img_size else "registry")
            if source == "checkpoint":
                check_img_size(img_size, f"the img_size recorded in {checkpoint} (pass --img-size / IMG_SIZE= to override)")
    model = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    if obj is not None and source in ("pos_embed", "registry"):
        assumed = (f"{why}, so {model.img_size} px is assumed" if source == "pos_embed" else
                   f"{why}: the registry default of {name}, {model.img_size} px, is assumed")
        _logger.warning("note: %s records no input size; %s (pass --img-size / IMG_SIZE= if it was trained at "
                        "another)", checkpoint, assumed)
    if obj is not None:
        load_checkpoint(model, obj, strict=strict, weights=weights)
        meta = checkpoint_meta(obj)
        extra: dict[str, Any] = {"weights": loaded_weights(obj, weights), "img_size_from": source}
        if meta.get("class_names"):
            extra["class_names"] = list(meta["class_names"])
        model.pretrained_cfg = {**model.pretrained_cfg, **extra}
    return model


def trained_like_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every Linear bias and every LayerNorm scale and shift seeded random values (in place), as a
    trained model has them; returns ``model``.

    A freshly initialised model has zero biases and unit LayerNorm scales
    (:meth:`t2t_vit.model.T2TViT._init_weights`). An exported graph keeps the Add of a zero bias only until
    a simplifier (onnxslim, or constant folding) drops it, so a graph or benchmark of such a model is
    cheaper than any trained checkpoint's, while an unsimplified baseline still pays for its Adds. Every
    command that runs without a checkpoint (``make onnx``, ``make bench``, the studies) calls this first.
    Biases and shifts ~ N(0, 0.02), scales ~ N(1, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                if module.bias is not None:
                    module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=gen))
    return model
