"""Rotary position embeddings (GPT-NeoX "rotate half" layout), for packed [T, H, D] tensors.

Both references build the angle table in float32 from per-row positions. They differ only
in where the rotation happens: LLaDA (OLMo, `rope_full_precision=True`) rotates q/k in
float32 and casts the result back; Dream (Qwen2) casts cos/sin to the activation dtype and
rotates in that dtype. `full_precision` selects between the two.
"""
from __future__ import annotations

import torch

from model_executor.layers.fused_dispatch import fused_kernels


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of shape [T, head_dim] for the given positions (positions within each row)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate x [T, H, D] by the per-token angles in cos/sin [T, D]; returns x's dtype."""
    if (fused := fused_kernels(x)) is not None:
        return fused.rotary(x, cos, sin, full_precision)
    return apply_rotary_reference(x, cos, sin, full_precision)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    cos, sin = cos[:, None, :], sin[:, None, :]
    if full_precision:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
