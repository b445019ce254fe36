"""Block-sparse attention through FlexAttention, built straight from the kept-tile lists.

Each row gets its own BlockMask from kv_num / kv_idx via BlockMask.from_kv_blocks (never
create_block_mask, which would evaluate a mask_mod over every tile). Every kept tile is listed
exactly once: as a FULL block, except a tile whose key block is the row's partial last block,
listed as a partial block whose mask_mod hides the keys past the row end (listing a tile both
ways would compute it twice). FlexAttention must run compiled: its eager fallback ignores the
full blocks. Pattern format: block_sparse_attn_ref.py.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


# Forward only: skip building the transposed (q-block) lists where this torch allows it.
_FORWARD_ONLY = ({"compute_q_blocks": False}
                 if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
                 else {})


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def row_block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor, length: int,
                   block_size: int) -> BlockMask:
    """kv_num [Hq, nb], kv_idx [Hq, nb, MAXK] of one row of `length` tokens -> BlockMask."""
    hq, nb = kv_num.shape
    kv_num = kv_num.to(torch.int32).contiguous()   # the flex kernels assume dense strides
    # from_kv_blocks / to_dense read the index width as the number of key blocks: pad to nb,
    # and zero the unused slots so no out-of-range index is ever stored.
    width = min(nb, kv_idx.shape[2])
    valid = torch.arange(width, device=kv_idx.device) < kv_num[..., None]
    idx = torch.zeros(hq, nb, nb, dtype=torch.int32, device=kv_idx.device)
    idx[..., :width] = torch.where(valid, kv_idx[..., :width], 0)
    padded_len = nb * block_size
    partial_num = torch.zeros_like(kv_num)
    if length != padded_len:
        last = idx.gather(2, (kv_num.long() - 1).clamp(min=0)[..., None])[..., 0]
        partial_num = ((kv_num > 0) & (last == nb - 1)).to(torch.int32)
        kv_num = kv_num - partial_num   # indices ascend: the partial block was the last one
    # The length is a tensor so rows of equal block count share one compiled kernel.
    limit = torch.tensor(length, device=kv_idx.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < limit

    return BlockMask.from_kv_blocks(
        partial_num[None], torch.full_like(idx, nb - 1)[None], kv_num[None], idx[None],
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(padded_len, padded_len),
        **_FORWARD_ONLY)


def kernel_options(block_size: int, device: torch.device) -> dict | None:
    """Inductor's GPU kernel tiles must divide the mask's blocks; its default config on Hopper
    (BLOCK_M 128) does not divide a 64 or 32 block and fails to compile ("Q and KV block size must
    be divisible by BLOCK_M and BLOCK_N"). Below 128 the tiles are the block itself."""
    if device.type != "cuda" or block_size >= 128:
        return None
    return {"BLOCK_M": block_size, "BLOCK_N": block_size}


def flex_block_sparse_attention(q, k, v, cu_seqlens, q_block_offsets, kv_num, kv_idx,
                                block_size: int, scale: float) -> torch.Tensor:
    """Same contract as block_sparse_attention (block_sparse_attn.py), through FlexAttention."""
    out = torch.empty_like(q)
    options = kernel_options(block_size, q.device)
    cu = cu_seqlens.tolist()
    qbo = q_block_offsets.tolist()
    flex = compiled_flex_attention()
    for b in range(len(cu) - 1):
        s, e, b0, b1 = cu[b], cu[b + 1], qbo[b], qbo[b + 1]
        if e == s:
            continue
        mask = row_block_mask(kv_num[:, b0:b1], kv_idx[:, b0:b1], e - s, block_size)
        pad = (0, 0, 0, 0, 0, (b1 - b0) * block_size - (e - s))
        qh, kh, vh = (F.pad(x[s:e], pad).transpose(0, 1)[None] for x in (q, k, v))
        o = flex(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=kh.shape[1] != qh.shape[1],
                 kernel_options=options)
        out[s:e] = o[0].transpose(0, 1)[: e - s]
    return out
