"""RMSNorm as both official implementations compute it (OLMo's RMSLayerNorm, Qwen2's RMSNorm)."""
from __future__ import annotations

import torch
from torch import nn

from model_executor.layers.fused_dispatch import fused_kernels


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale (and shift) in that dtype.

    The order matters in bf16: multiplying by the weight after the cast is what both
    references do, and doing it in float32 instead changes the rounding.
    """

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fused := fused_kernels(x)) is not None:
            return fused.rms_norm(x, self.weight, self.bias, self.eps)
        return self.reference(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)): the residual add and the next norm in one pass."""
        if (fused := fused_kernels(x)) is not None:
            return fused.rms_norm(x, self.weight, self.bias, self.eps, residual=residual)
        x = x + residual
        return x, self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if self.bias is None else out + self.bias
