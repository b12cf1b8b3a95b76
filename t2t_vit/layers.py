"""Building blocks of T2T-ViT (arXiv 2101.11986).

Parameter names follow the authors' release exactly, so their checkpoints load unchanged:
``tokens_to_token.attention{1,2}.{kqv,proj,norm1,norm2,mlp.0,mlp.2,w}`` for the Performer,
``tokens_to_token.attention{1,2}.{attn.qkv,attn.proj,norm1,norm2,mlp.fc1,mlp.fc2}`` for the token
transformer, and timm-style ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

__all__ = [
    "sinusoid_table",
    "SoftSplit",
    "TokenPerformer",
    "TokenTransformer",
    "Attention",
    "Block",
]


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """Fixed sinusoid position table of shape (1, n_position, dim).

    Even columns hold sin, odd columns cos, of ``pos / 10000 ** (2 * (j // 2) / dim)``. Computed in
    float64 and rounded once, like the authors' numpy table.
    """
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


class SoftSplit(nn.Module):
    """Overlapping patch extraction ("soft split"): ``nn.Unfold`` followed by a transpose.

    Output is (B, L, C*k*k) with Unfold's channel order ``c*k*k + ky*k + kx``. Two forms compute the same
    numbers exactly (each output is one input value, copied):

    * ``impl="unfold"`` (default): ``F.unfold``, the training form.
    * ``impl="grouped"``: a grouped convolution, ``groups=C``, each group copying its one input channel
      to its k*k outputs with a one-hot (k*k, 1, k, k) kernel: C*k^4 multiply-adds per output pixel.
      The export form: one ONNX ``Conv`` instead of the Gather/GatherND chains exporters emit for
      Unfold (TensorRT has no Im2Col).

    The kernel is a non-persistent buffer, so the state dict is the same for every form.
    """

    IMPLS = ("unfold", "grouped")

    def __init__(self, in_chans: int, kernel_size: int, stride: int, padding: int, impl: str = "unfold"):
        super().__init__()
        self.in_chans = in_chans
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.out_chans = in_chans * kernel_size * kernel_size
        kk = kernel_size * kernel_size
        # Group c holds output channels c*k*k .. c*k*k + k*k - 1, the same order as Unfold's.
        grouped = torch.eye(kk, dtype=torch.float32).reshape(kk, 1, kernel_size, kernel_size).repeat(in_chans, 1, 1, 1)
        self.register_buffer("one_hot_grouped", grouped, persistent=False)
        self.impl = impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in self.IMPLS:
            hint = " (the dense one-hot form is an export option: export.patterns.soft_split_as_conv(model, 'conv'))"
            raise ValueError(f"SoftSplit impl must be one of {self.IMPLS}, got {value!r}"
                             + (hint if value == "conv" else ""))
        self._impl = value

    def out_size(self, in_size: int) -> int:
        return (in_size + 2 * self.padding - self.kernel_size) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._impl == "grouped":
            y = F.conv2d(x, self.one_hot_grouped.to(x.dtype), stride=self.stride, padding=self.padding,
                         groups=self.in_chans)
            return y.flatten(2).transpose(1, 2)
        y = F.unfold(x, self.kernel_size, stride=self.stride, padding=self.padding)
        return y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_chans}, k={self.kernel_size}, s={self.stride}, p={self.padding}, impl={self._impl}"


class TokenPerformer(nn.Module):
    """Single-head Performer block of the T2T module (linear attention with positive random features).

    The authors compute ``phi(x) = exp(w.x - |x|^2/2) / sqrt(m)``, which reaches exp(16)/sqrt(32)
    (1.6e6) and overflows fp16. The attention output is invariant to scaling phi(q_t) by a per-token
    constant and phi(k) by a per-sample constant (they cancel between numerator and denominator),
    so this implementation subtracts the per-token max from the q exponent (where ``|q|^2/2`` is
    constant over features and cancels exactly) and the per-sample max (plus log T) from the k
    exponent: every feature is <= 1, sum_s phi(k_s) <= 1 and the normaliser D <= m, whatever the
    dtype. The authors' epsilon (1e-8) is rescaled by the same constants, so the fp32 result equals
    the original formula up to rounding. The maxima are detached: the scaled function equals the
    original one locally, so gradients are identical too.

    ``fp32_core`` (default True) runs the linear-attention core, between the ``kqv`` and ``proj``
    Linears, in float32 when the block runs in fp16/bf16 or under autocast. Finite is not enough:
    the k exponent ``w.k - |k|^2/2`` subtracts terms of size 1e2 to get the O(1) differences exp()
    needs (fp16 spacing there is 0.06-0.125), and D and the rescaled epsilon can leave the fp16
    range. What an all-fp16 core costs on a given checkpoint is measured by the export report's
    contrast row (docs/export.md has the reference checkpoint's numbers). The core costs T x m x emb MACs per matmul (3136 x 32 x 64 at 224 px), nothing
    next to the backbone, so this deliberate fp32 island is also what the fp16 ONNX graph contains.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, dp1: float = 0.1, dp2: float = 0.1,
                 fp32_core: bool = True):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),
            nn.Linear(self.emb, self.emb),
            nn.Dropout(dp2),
        )
        self.m = int(self.emb * kernel_ratio)
        # Orthogonal rows scaled to norm sqrt(m); frozen and stored in the state dict. A checkpoint
        # must provide it: re-drawing it changes the model.
        w = nn.init.orthogonal_(torch.empty(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)
        self.fp32_core = fp32_core

    def linear_attention(self, k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """phi(q) (sum_s phi(k_s) v_s^T) / (phi(q) . sum_s phi(k_s) + eps), in the max-shifted form."""
        num_tokens = k.shape[1]
        w = self.w.to(k.dtype)
        wq = torch.matmul(q, w.t())  # (B, T, m): plain MatMuls, no einsum
        wq_max = wq.amax(dim=-1, keepdim=True).detach()
        b = torch.matmul(k, w.t()) - 0.5 * (k * k).sum(dim=-1, keepdim=True)  # log(phi(k) sqrt(m))
        b_max = b.amax(dim=(1, 2), keepdim=True).detach()  # (B, 1, 1) per sample
        log_t = math.log(num_tokens)
        qp = torch.exp(wq - wq_max)  # <= 1; |q|^2/2 is the same for every feature and cancels
        kp = torch.exp(b - (b_max + log_t))  # <= 1 / T, so sums over tokens stay <= 1
        k_sum = kp.sum(dim=1, keepdim=True)  # (B, 1, m)
        d = (qp * k_sum).sum(dim=-1, keepdim=True)  # (B, T, 1), <= m
        y = torch.matmul(qp, torch.matmul(kp.transpose(1, 2), v))  # (B, T, emb)
        # The authors' epsilon in the rescaled units: eps * m / T * exp(-(a_max + b_max)), where
        # a_max = max_m(w.q) - |q|^2/2 is the per-token shift of the unshifted q exponent.
        a_max = wq_max - 0.5 * (q * q).sum(dim=-1, keepdim=True).detach()
        eps = torch.exp((math.log(self.epsilon * self.m) - log_t) - (a_max + b_max))
        # Guard 0/0 when every feature underflows; the smallest normal number of the dtype is far
        # below any D that carries information.
        return y / torch.clamp(d + eps, min=torch.finfo(d.dtype).tiny)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # authors' order: k, q, v
        if self.fp32_core:
            # Deliberate fp32 island (see the class docstring); a no-op for fp32 models.
            core = torch.promote_types(v.dtype, torch.float32)  # fp16/bf16 -> fp32; fp32/fp64 unchanged
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = self.linear_attention(k.to(core), q.to(core), v.to(core)).to(v.dtype)
        else:
            y = self.linear_attention(k, q, v)
        return v + self.dp(self.proj(y))  # residual on v: widths differ (dim -> emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool,
               dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale) v on (B, H, N, D) tensors.

    ``fused`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels never store the
    N x N map). The explicit path applies the scale to q *before* q @ k^T: that is the pattern
    TensorRT fuses into one attention kernel (MatMul -> Softmax -> MatMul).
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = torch.matmul(q * scale, k.transpose(-2, -1))
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.matmul(attn, v)


class TokenAttention(nn.Module):
    """Single-head attention of the token transformer: dim -> in_dim, residual on v."""

    def __init__(self, dim: int, in_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused_attn: bool = True):
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5  # the INPUT width (147 or 576), as in the authors' code
        self.qkv = nn.Linear(dim, in_dim * 3, bias=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = fused_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, 1, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, 1, N, in_dim) each
        drop = self.attn_drop if self.training else 0.0
        y = _attention(q, k, v, self.scale, self.fused_attn, drop)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.in_dim)))
        return v.squeeze(1) + y


class TokenTransformer(nn.Module):
    """Token transformer block of the T2T module (t2t_vit_t_*)."""

    def __init__(self, dim: int, in_dim: int, mlp_ratio: float = 1.0, fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=int(in_dim * mlp_ratio), out_features=in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention of the backbone; scale = head_dim ** -0.5."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = fused_attn
        self.query_tokens: int | None = None  # set: outputs for the first query_tokens tokens only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        n = self.query_tokens or t
        q, k, v = self._qkv(x, n)  # (B, heads, tokens, head_dim): 4-D MatMuls for TensorRT's fusion
        drop = self.attn_drop if self.training else 0.0
        y = _attention(q, k, v, self.scale, self.fused_attn, drop)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))

    def _qkv(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q for the first ``n`` tokens, k and v for all of them. With ``n`` below the token count
        (``query_tokens``) the q projection runs on those ``n`` rows only, so q @ k^T, attn @ v and proj do too."""
        b, t, c = x.shape
        if n == t:
            qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        if type(self.qkv) is nn.Linear:
            w, bias = self.qkv.weight, self.qkv.bias
            kv = F.linear(x, w[c:], None if bias is None else bias[c:])
            q = F.linear(x[:, :n], w[:c], None if bias is None else bias[:c])
        else:  # another module in its place (a study's kernel): one projection of every token, q's rows taken from it
            qkv = self.qkv(x)
            q, kv = qkv[:, :n, :c], qkv[..., c:]
        k, v = kv.reshape(b, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2), k, v


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    @property
    def query_tokens(self) -> int | None:
        """None: every token's output (the default). n: the first n tokens' outputs only, (B, n, C); the
        attention output, residual and MLP are computed for those tokens alone (:meth:`Attention._qkv`)."""
        return self.attn.query_tokens

    @query_tokens.setter
    def query_tokens(self, n: int | None) -> None:
        self.attn.query_tokens = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.attn(self.norm1(x)))
        x = (x[:, :self.query_tokens] if self.query_tokens else x) + y
        return x + self.drop_path(self.mlp(self.norm2(x)))
