"""Kept-tile lists from a stored SparseD pattern (Triton), for every sparse step and layer.

The pool keeps one bit per tile: uint8 [H, nq, ceil(nk / 8)], bit j % 8 of byte j // 8 for key
block j (sparsed_pattern.pack_bits). The attention kernels want, per (head, query block), the
number of kept key blocks and their indices in ascending order. One program per (query block,
head) expands its bits, prefix-sums them into slots and scatters the indices: no host
synchronisation and no [H, nq, nk] tensor, where the torch path (unpack_bits + kv_lists in
sparsed_pattern.py, the reference) needs both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pattern_lists_kernel(BITS, NUM, IDX, nk, n_bytes, stride_bh, stride_bq, stride_nh,
                          stride_ih, stride_iq, BYTES: tl.constexpr):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.arange(0, BYTES)
    packed = tl.load(BITS + h * stride_bh + qb * stride_bq + b, mask=b < n_bytes, other=0).to(tl.int32)
    bits = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1        # [BYTES, 8]: key block 8*byte + bit
    keep = tl.reshape(bits, [BYTES * 8])
    j = tl.arange(0, BYTES * 8)
    keep = tl.where(j < nk, keep, 0)
    slot = tl.cumsum(keep, axis=0) - keep                              # ascending order of kept blocks
    tl.store(NUM + h * stride_nh + qb, tl.sum(keep, axis=0))
    tl.store(IDX + h * stride_ih + qb * stride_iq + slot, j, mask=keep != 0)


def pattern_lists(bits: torch.Tensor, nk: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bits uint8 [H, nq, ceil(nk / 8)] -> (kv_num int32 [H, nq], kv_idx int32 [H, nq, width]);
    width >= nk. Entries of kv_idx past a row's kv_num are left unset (the kernels never read them)."""
    h, nq, n_bytes = bits.shape
    if n_bytes != -(-nk // 8) or width < nk:
        raise ValueError(f"bits {tuple(bits.shape)} do not hold {nk} key blocks, or width={width} < {nk}")
    bits = bits.contiguous()
    num = torch.empty(h, nq, dtype=torch.int32, device=bits.device)
    idx = torch.empty(h, nq, width, dtype=torch.int32, device=bits.device)
    if h and nq:
        _pattern_lists_kernel[(nq, h)](bits, num, idx, nk, n_bytes, bits.stride(0), bits.stride(1),
                                       num.stride(0), idx.stride(0), idx.stride(1),
                                       BYTES=triton.next_power_of_2(n_bytes), num_warps=4)
    return num, idx
