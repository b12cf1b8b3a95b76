"""An independent, literal re-statement of the authors' T2T-ViT forward pass: the reference the model tests
check against, and the baseline the CPU benchmark (``make bench-cpu``) measures speed-ups from.

Written from the published description (arXiv 2101.11986 and the authors' models/t2t_vit.py), deliberately in the authors' own
style and NOT sharing any code with ``t2t_vit``: ``nn.Unfold``, ``torch.einsum`` for the Performer,
the unscaled feature map ``exp(w.x - |x|^2/2) / sqrt(m)`` with epsilon 1e-8, explicit softmax
attention with the scale applied after q @ k^T, and a numpy sinusoid table. It is a pure function
of a state dict, so a model and this reference see exactly the same weights; :class:`AuthorsModel` wraps
it as an ``nn.Module`` for timing and for a plain ``torch.onnx.export``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Key suffix under which a weights dict may carry another kernel for a Linear (see AuthorsModel.with_linear_kernel).
LINEAR_KERNEL = ".__kernel__"


def numpy_sinusoid(n_position: int, d_hid: int) -> torch.Tensor:
    def angles(pos):
        return [pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)]

    table = np.array([angles(p) for p in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0)


def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _lin(x, sd, p):
    kernel = sd.get(p + LINEAR_KERNEL)  # another kernel for this Linear (AuthorsModel.with_linear_kernel)
    if kernel is not None:
        return kernel(x)
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _performer(x, sd, p, dtype=None):
    """Token_performer.forward as released (einsum, unscaled features, eps 1e-8)."""
    x = _ln(x, sd, p + ".norm1")
    emb = sd[p + ".proj.weight"].shape[0]
    w = sd[p + ".w"]
    m = w.shape[0]
    k, q, v = torch.split(_lin(x, sd, p + ".kqv"), emb, dim=-1)

    def prm_exp(t):
        xd = ((t * t).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", t, w.to(t.dtype))
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v, kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (d.repeat(1, 1, emb) + 1e-8)
    y = v + _lin(y, sd, p + ".proj")
    h = _lin(F.gelu(_lin(_ln(y, sd, p + ".norm2"), sd, p + ".mlp.0")), sd, p + ".mlp.2")
    return y + h


def _token_transformer(x, sd, p):
    x = _ln(x, sd, p + ".norm1")
    b, n, c = x.shape
    in_dim = sd[p + ".attn.proj.weight"].shape[0]
    scale = c ** -0.5  # num_heads = 1, head_dim = the input width
    qkv = _lin(x, sd, p + ".attn.qkv").reshape(b, n, 3, 1, in_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, in_dim)
    y = v.squeeze(1) + _lin(y, sd, p + ".attn.proj")
    h = _lin(F.gelu(_lin(_ln(y, sd, p + ".norm2"), sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
    return y + h


def _block(x, sd, p, num_heads):
    b, n, c = x.shape
    h = _ln(x, sd, p + ".norm1")
    qkv = _lin(h, sd, p + ".attn.qkv").reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(dim=-1)
    x = x + _lin((attn @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".attn.proj")
    h = _lin(F.gelu(_lin(_ln(x, sd, p + ".norm2"), sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
    return x + h


def authors_forward(sd: dict, x: torch.Tensor, num_heads: int, tokens_type: str) -> torch.Tensor:
    """Logits of the authors' model for weights ``sd`` (eval mode: no dropout)."""
    sd = {k: v.to(x.dtype) if torch.is_tensor(v) else v for k, v in sd.items()}
    attn = _performer if tokens_type == "performer" else _token_transformer
    b = x.shape[0]
    t = F.unfold(x, kernel_size=7, stride=4, padding=2).transpose(1, 2)
    t = attn(t, sd, "tokens_to_token.attention1")
    side = int(np.sqrt(t.shape[1]))
    t = t.transpose(1, 2).reshape(b, t.shape[2], side, side)
    t = F.unfold(t, kernel_size=3, stride=2, padding=1).transpose(1, 2)
    t = attn(t, sd, "tokens_to_token.attention2")
    side = int(np.sqrt(t.shape[1]))
    t = t.transpose(1, 2).reshape(b, t.shape[2], side, side)
    t = F.unfold(t, kernel_size=3, stride=2, padding=1).transpose(1, 2)
    t = _lin(t, sd, "tokens_to_token.project")
    embed = t.shape[-1]
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t), dim=1)
    t = t + numpy_sinusoid(t.shape[1], embed).to(x.device, x.dtype)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        t = _block(t, sd, f"blocks.{i}", num_heads)
    t = _ln(t, sd, "norm")
    return _lin(t[:, 0], sd, "head")


class AuthorsModel(torch.nn.Module):
    """:func:`authors_forward` as a module: the weights of ``model`` (a state dict) as buffers."""

    def __init__(self, state_dict: dict, num_heads: int, tokens_type: str):
        super().__init__()
        self.names = []
        for i, (k, v) in enumerate(state_dict.items()):
            self.register_buffer(f"w{i}", v.detach().clone())
            self.names.append(k)
        self.num_heads = num_heads
        self.tokens_type = tokens_type

        self.kernels = torch.nn.ModuleDict()
        self.kernel_keys: dict[str, str] = {}  # Linear prefix -> its key in self.kernels (no dots allowed there)

    def with_linear_kernel(self, make: Callable[[torch.Tensor, torch.Tensor | None], torch.nn.Module]) -> "AuthorsModel":
        """Every Linear (each 2-D ``*.weight``) computed by ``make(weight, bias)`` instead of ``F.linear``: the
        same kernel choice as a model's (e.g. ``studies.onednn.OneDNNLinear``), to tell the formulation's
        speed from the kernel library's. Returns self."""
        sd = dict(zip(self.names, (getattr(self, f"w{i}") for i in range(len(self.names)))))
        for k, w in sd.items():
            if k.endswith(".weight") and w.dim() == 2:
                p = k[: -len(".weight")]
                self.kernel_keys[p] = p.replace(".", "_")
                self.kernels[self.kernel_keys[p]] = make(w, sd.get(p + ".bias"))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sd = {k: getattr(self, f"w{i}") for i, k in enumerate(self.names)}
        sd.update({p + LINEAR_KERNEL: self.kernels[key] for p, key in self.kernel_keys.items()})
        return authors_forward(sd, x, self.num_heads, self.tokens_type)
