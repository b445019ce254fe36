"""The SwiGLU feed-forward both families use: down(silu(gate(x)) * up(x)).

A function rather than a module so each model keeps its official parameter names
(LLaDA: ff_proj/up_proj/ff_out, Dream: gate_proj/up_proj/down_proj).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(F.silu(gate(x)) * up(x))
