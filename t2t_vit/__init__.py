"""T2T-ViT model package: every variant of the authors' release, registered in timm."""
from .model import ARCHS, T2TViT, list_t2t_models  # noqa: F401  (import registers the models)

__version__ = "0.1.0"
