"""RMSNorm as both official implementations compute it (OLMo's RMSLayerNorm, Qwen2's RMSNorm)."""
from __future__ import annotations

import torch
from torch import nn


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if self.bias is None else out + self.bias
