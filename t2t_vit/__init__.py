"""T2T-ViT model package: every variant of the authors' release, registered in timm."""
import argparse as _argparse

import torch as _torch

from .model import ARCHS, T2TViT, list_t2t_models  # noqa: F401  (import registers the models)

__version__ = "0.1.0"

# Checkpoints written by the authors' (timm) training script store an argparse.Namespace of plain
# values under "args". Allow exactly that class in weights_only unpickling, so timm's own loader
# (timm.create_model(name, checkpoint_path=...), weights_only=True) reads those files unchanged.
_torch.serialization.add_safe_globals([_argparse.Namespace])
