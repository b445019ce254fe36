"""Dense bidirectional attention of one row through torch SDPA, the fastest backend available."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# On Hopper cuDNN attention measured fastest (benchmarks/RESULTS.md); SDPA falls back down this list when a
# backend rejects the inputs (head_dim, dtype, arch), so the choice is automatic and safe.
_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# SPARSED_SDPA_BACKEND=flash|cudnn|efficient|math pins one (benchmarks compare them).
SDPA_ENV = "SPARSED_SDPA_BACKEND"
_NAMED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_BACKENDS = tuple(_NAMED)


def cuda_order() -> list[SDPBackend]:
    pinned = os.environ.get(SDPA_ENV)
    if not pinned:
        return _CUDA_ORDER
    if pinned not in _NAMED:
        raise ValueError(f"{SDPA_ENV}={pinned!r}: choose from {sorted(_NAMED)}")
    return [_NAMED[pinned]]


def expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[L, Hkv, D] -> [L, Hq, D] by repeating each KV head for its query group (GQA)."""
    group = num_heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def _heads_first(q, k, v):
    h = q.shape[1]
    return (q.transpose(0, 1).unsqueeze(0), expand_kv(k, h).transpose(0, 1).unsqueeze(0),
            expand_kv(v, h).transpose(0, 1).unsqueeze(0))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], no mask (bidirectional)."""
    qh, kh, vh = _heads_first(q, k, v)
    if q.is_cuda:
        with sdpa_kernel(cuda_order(), set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def dense_attention_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention plus each query's natural-log log-sum-exp [Hq, L] when a CUDA kernel
    returns it for free (cuDNN or flash); (out, None) elsewhere. Only for half precision: called
    directly, the cuDNN op does not refuse float32 but returns garbage (NaN on an H200)."""
    if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get(SDPA_ENV) in (None, "", "cudnn", "flash")):
        qh, kh, vh = (t.contiguous() for t in _heads_first(q, k, v))
        ops = [("cudnn", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qh, kh, vh, None, True, 0.0, False, False, scale=scale)),
               ("flash", lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                    qh, kh, vh, 0.0, False, False, scale=scale))]
        pinned = os.environ.get(SDPA_ENV)
        for name, op in ops:
            if pinned and name != pinned:
                continue
            try:
                res = op()
            except RuntimeError:
                continue  # this kernel rejects the inputs: try the next one
            out, lse = res[0], res[1]
            return out.squeeze(0).transpose(0, 1), lse.reshape(q.shape[1], q.shape[0]).float()
    return dense_attention(q, k, v, scale), None
