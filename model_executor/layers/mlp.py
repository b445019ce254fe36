"""The SwiGLU feed-forward both families use: down(silu(gate(x)) * up(x)).

A function rather than a module so each model keeps its official parameter names
(LLaDA: ff_proj/up_proj/ff_out, Dream: gate_proj/up_proj/down_proj).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_executor.layers.fused_dispatch import fused_kernels


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    g, u = gate(x), up(x)
    fused = fused_kernels(g)
    return down(fused.silu_mul(g, u) if fused is not None else F.silu(g) * u)
