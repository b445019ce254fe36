"""Dense bidirectional attention of one row through torch SDPA, the fastest backend available."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# On Hopper cuDNN attention measured fastest (DESIGN.md); SDPA falls back down this list when a
# backend rejects the inputs (head_dim, dtype, arch), so the choice is automatic and safe.
_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[L, Hkv, D] -> [L, Hq, D] by repeating each KV head for its query group (GQA)."""
    group = num_heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    order: list[SDPBackend] | None = None) -> torch.Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], no mask (bidirectional)."""
    qh = q.transpose(0, 1).unsqueeze(0)
    kh = expand_kv(k, q.shape[1]).transpose(0, 1).unsqueeze(0)
    vh = expand_kv(v, q.shape[1]).transpose(0, 1).unsqueeze(0)
    if q.is_cuda:
        with sdpa_kernel(order or _CUDA_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return out.squeeze(0).transpose(0, 1)
