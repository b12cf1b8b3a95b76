"""oneDNN for PyTorch's fp32 Linear layers on the CPU: a study of kernel choice, not part of the model.

``make bench-cpu`` times the model with its ``nn.Linear`` layers computed by oneDNN (``onednn_linears``)
next to PyTorch's own GEMM; docs/cpu-speed.md says when that pays. The model package
(``t2t_vit/layers.py``) knows nothing of it: the copy this module makes swaps modules, so the model itself
stays the numerical reference and the one to train, save and export.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["OneDNNLinear", "onednn_linears"]


class OneDNNLinear(nn.Module):
    """An inference-only ``nn.Linear`` computed by oneDNN (``aten::mkldnn_linear``) in float32 on the CPU.

    PyTorch's own fp32 CPU GEMM goes through its BLAS (MKL in the official wheels), which on some x86 CPUs,
    AMD's among them, runs well below the vector units' rate; oneDNN picks the kernel for the CPU it runs on.
    The weights are converted to oneDNN tensors once; each call converts its input and output (dense <->
    oneDNN). Results equal ``nn.Linear`` to float32 rounding (another summation order).
    """

    def __init__(self, linear: nn.Linear | None = None, *, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if linear is not None:
            weight, bias = linear.weight, linear.bias
        if weight is None or weight.dim() != 2:
            raise ValueError("OneDNNLinear needs an nn.Linear or a 2-D weight")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        bias = bias.detach().float() if bias is not None else torch.zeros(self.out_features)
        # Not in the state dict: this module is made from a trained Linear, never saved.
        self.register_buffer("weight", weight.to_mkldnn(), persistent=False)
        self.register_buffer("bias", bias.to_mkldnn(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"OneDNNLinear computes float32 on the CPU; got {x.dtype} on {x.device}")
        return torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def __deepcopy__(self, memo: dict) -> "OneDNNLinear":
        # oneDNN tensors have no storage to copy; rebuild from their dense values.
        return OneDNNLinear(weight=self.weight.to_dense(), bias=self.bias.to_dense())


def onednn_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for fp32 CPU inference with every ``nn.Linear`` replaced by :class:`OneDNNLinear`.

    The copy is in eval mode and has no gradients (use it under ``torch.inference_mode()``); the caller's model
    is untouched, so it stays the numerical reference and the one to train or save. Raises RuntimeError when
    this PyTorch build has no oneDNN (``torch.backends.mkldnn.is_available()``).
    """
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    out = copy.deepcopy(model).eval().float().cpu()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear(child))
    return out.requires_grad_(False)
