"""T2T-ViT models and their timm registry entries.

``ARCHS`` is the only place a variant's sizes are declared and ``_cfg`` the only place its data
config is; every stage (train, export, calibration, engines, parity) looks a model up by name.
After ``import t2t_vit``, ``timm.create_model("t2t_vit_14", num_classes=10, img_size=384)`` works.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from .errors import T2TError
from .layers import Block, SoftSplit, TokenPerformer, TokenTransformer, sinusoid_table

__all__ = ["T2TModule", "T2TViT", "ARCHS", "TEST_MODELS", "list_t2t_models", "ModelConfigError",
           "check_img_size"]


class ModelConfigError(T2TError, ValueError):
    """A model name or size that does not exist; the message lists what does."""


def check_img_size(img_size: int, what: str = "img_size") -> None:
    """Raise unless ``img_size`` is a positive multiple of 16 (the T2T stage downsamples by 16).

    ``what`` names where the size came from in the message: the user's flag and make variable
    (``"--img-size (IMG_SIZE=)"``) or a checkpoint's record.
    """
    if img_size <= 0 or img_size % 16:
        raise ModelConfigError(f"{what} must be a positive multiple of 16 (the T2T stage downsamples by 16), got "
                               f"{img_size}; try {max(16, round(img_size / 16) * 16)}")


class T2TModule(nn.Module):
    """Tokens-to-token stage: three soft splits with a Performer/Transformer block between them.

    At 224 px: 3x224x224 -> (7x7/4) 3136 x 147 -> attention1 -> 64x56x56 -> (3x3/2) 784 x 576 ->
    attention2 -> 64x28x28 -> (3x3/2) 196 x 576 -> project -> 196 x embed_dim.
    """

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", in_chans: int = 3,
                 embed_dim: int = 768, token_dim: int = 64, fused_attn: bool = True):
        super().__init__()
        self.soft_split0 = SoftSplit(in_chans, 7, 4, 2)
        self.soft_split1 = SoftSplit(token_dim, 3, 2, 1)
        self.soft_split2 = SoftSplit(token_dim, 3, 2, 1)
        dim0, dim1 = self.soft_split0.out_chans, self.soft_split1.out_chans
        if tokens_type == "performer":
            self.attention1 = TokenPerformer(dim0, token_dim, kernel_ratio=0.5)
            self.attention2 = TokenPerformer(dim1, token_dim, kernel_ratio=0.5)
        elif tokens_type == "transformer":
            self.attention1 = TokenTransformer(dim0, token_dim, mlp_ratio=1.0, fused_attn=fused_attn)
            self.attention2 = TokenTransformer(dim1, token_dim, mlp_ratio=1.0, fused_attn=fused_attn)
        else:
            raise ModelConfigError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.project = nn.Linear(self.soft_split2.out_chans, embed_dim)
        # Grid sizes are fixed here so forward() has no data-dependent shape arithmetic (export-safe).
        self.grid1 = self.soft_split0.out_size(img_size)
        self.grid2 = self.soft_split1.out_size(self.grid1)
        self.grid3 = self.soft_split2.out_size(self.grid2)
        self.token_dim = token_dim
        self.num_patches = self.grid3 * self.grid3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.attention1(self.soft_split0(x))
        x = x.transpose(1, 2).reshape(b, self.token_dim, self.grid1, self.grid1)
        x = self.attention2(self.soft_split1(x))
        x = x.transpose(1, 2).reshape(b, self.token_dim, self.grid2, self.grid2)
        return self.project(self.soft_split2(x))


class T2TViT(nn.Module):
    """T2T-ViT classifier with the authors' parameter names (checkpoint compatible)."""

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, token_dim: int = 64,
                 fused_attn: bool = True):
        super().__init__()
        check_img_size(img_size)
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.tokens_type = tokens_type
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim, fused_attn)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A fixed sinusoid table, stored as a frozen parameter (so it is in the state dict, as in
        # the authors' release) and rebuilt analytically for any grid.
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], fused_attn=fused_attn)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every softmax attention between SDPA (True) and the explicit MatMul path (False)."""
        for m in self.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = enable

    def set_soft_split_impl(self, impl: str) -> None:
        """Switch every soft split between ``F.unfold`` ("unfold") and the one-hot grouped convolution
        ("grouped"), :class:`t2t_vit.layers.SoftSplit`."""
        for m in self.modules():
            if isinstance(m, SoftSplit):
                m.impl = impl

    def set_performer_fp32_core(self, enable: bool) -> None:
        """Run each Performer's linear-attention core in float32 (True, default) or in the model dtype."""
        for m in self.modules():
            if isinstance(m, TokenPerformer):
                m.fp32_core = enable

    def set_cls_only_last_block(self, enable: bool = True) -> None:
        """Compute the last block for the class token only (an inference option, off by default).

        The head reads nothing but the class token, and in the last block no other token's output reaches
        it: the queries, attention rows, ``proj`` and MLP are needed for the class token alone (keys and
        values still come from every token). The logits are the same up to float rounding; the last
        block's query-side work drops to 1/N of it (N = 197 tokens at 224 px). While it is on,
        ``forward_features`` returns the class token only, (B, 1, C).
        """
        self.blocks[-1].query_tokens = 1 if enable else None

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens_to_token(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((cls, x), dim=1) + self.pos_embed.to(x.dtype)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# name -> architecture (the authors' models/t2t_vit.py); the tests check the parameter counts and every
# state-dict key and shape against the authors' released checkpoints.
ARCHS: dict[str, dict[str, Any]] = {
    "t2t_vit_7": dict(tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(tokens_type="performer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(tokens_type="performer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_t_14": dict(tokens_type="transformer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_t_19": dict(tokens_type="transformer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_t_24": dict(tokens_type="transformer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_14_resnext": dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.0),
    "t2t_vit_14_wide": dict(tokens_type="performer", embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0),
    # Tiny variants for seconds-long CPU paths in tests and demos (not ImageNet models): a Performer T2T
    # stage, and a token-transformer one (the t2t_vit_t_* family).
    "t2t_vit_test": dict(tokens_type="performer", embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16),
    "t2t_vit_t_test": dict(tokens_type="transformer", embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                           token_dim=16),
}
TEST_MODELS = ("t2t_vit_test", "t2t_vit_t_test")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "tokens_to_token.soft_split0",
        "classifier": "head",
        "license": "other",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in ARCHS if name not in TEST_MODELS},
    # The authors' 384-px t2t_vit_14 checkpoint: timm.create_model("t2t_vit_14.in1k_384").
    "t2t_vit_14.in1k_384": _cfg(input_size=(3, 384, 384)),
    "t2t_vit_test": _cfg(input_size=(3, 64, 64)),
    "t2t_vit_t_test": _cfg(input_size=(3, 64, 64)),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """Shared builder: the architecture comes from ``ARCHS``; weights are loaded by timm/our loader.

    ``img_size`` defaults to the pretrained config's input size, and the model's ``pretrained_cfg``
    is updated to the size actually built, so ``resolve_data_config`` stays truthful.
    """
    arch = dict(ARCHS[variant.split(".")[0]])
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    kwargs.pop("cache_dir", None)
    img_size = kwargs.pop("img_size", None)
    if img_size is None:
        img_size = cfg.input_size[-1]
    if isinstance(img_size, (tuple, list)):
        if len(set(img_size[-2:])) != 1:
            raise ModelConfigError(f"T2T-ViT takes square inputs only, got img_size={tuple(img_size)}")
        img_size = img_size[-1]
    arch.update(kwargs)
    model = build_model_with_cfg(T2TViT, variant, pretrained, pretrained_cfg=cfg, img_size=img_size, **arch)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size),
                            "num_classes": model.num_classes}
    model.default_cfg = model.pretrained_cfg
    return model


def _make_entry_point(name: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> T2TViT:
        return _create(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"{name}: {ARCHS[name]}"
    return entry


for _name in ARCHS:
    setattr(sys.modules[__name__], _name, register_model(_make_entry_point(_name)))


def list_t2t_models(include_test: bool = True) -> list[str]:
    """Registered T2T-ViT model names, in ``ARCHS`` order."""
    return [n for n in ARCHS if include_test or n not in TEST_MODELS]
