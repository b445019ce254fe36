"""Plain-torch block-sparse attention: the reference for the Triton kernel and its CPU fallback.

Pattern format (shared by every block-sparse op here), for B packed rows:
  cu_seqlens      int32 [B+1]  token offsets of the rows
  q_block_offsets int32 [B+1]  cumulative ceil(len_b / block_size)
  kv_num          int32 [Hq, NQ]        kept key blocks per (head, query block)
  kv_idx          int32 [Hq, NQ, MAXK]  their row-local indices, ascending, first kv_num valid
"""
from __future__ import annotations

import torch

# Query blocks handled at once per row: bounds memory to O(chunk * block_size * L * Hq).
_CHUNK_BLOCKS = 16


def tile_mask_from_lists(kv_num: torch.Tensor, kv_idx: torch.Tensor, nb: int) -> torch.Tensor:
    """kv_num [H, n], kv_idx [H, n, MAXK] of one row -> bool tile mask [H, n, nb]."""
    h, n, maxk = kv_idx.shape
    valid = torch.arange(maxk, device=kv_idx.device) < kv_num[..., None].long()
    # Invalid slots point at an extra column that is dropped afterwards.
    cols = torch.where(valid, kv_idx.long(), nb)
    mask = torch.zeros(h, n, nb + 1, dtype=torch.bool, device=kv_idx.device)
    mask.scatter_(2, cols, True)
    return mask[..., :nb]


def _row_attention(q, k, v, tiles, block_size, scale):
    """One row: q [L, Hq, D], k/v [L, Hkv, D], tiles bool [Hq, nb, nb] -> [L, Hq, D] float32."""
    length, hq, _ = q.shape
    group = hq // k.shape[1]
    qh = q.float().transpose(0, 1)
    kh = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    key_mask = tiles.repeat_interleave(block_size, dim=2)[..., :length]   # [Hq, nb, L]
    out = torch.empty_like(qh)
    step = _CHUNK_BLOCKS * block_size
    for t0 in range(0, length, step):
        t1 = min(t0 + step, length)
        rows = torch.arange(t0, t1, device=q.device) // block_size
        mask = key_mask[:, rows]                                           # [Hq, c, L]
        s = torch.einsum("hqd,hkd->hqk", qh[:, t0:t1], kh) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)   # a query with no kept key -> zeros
        out[:, t0:t1] = torch.einsum("hqk,hkd->hqd", p, vh)
    return out.transpose(0, 1)


def block_sparse_attention_ref(q, k, v, cu_seqlens, q_block_offsets, kv_num, kv_idx,
                               block_size: int, scale: float) -> torch.Tensor:
    """Bidirectional attention of each query block over exactly its kept key blocks."""
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    qbo = q_block_offsets.tolist()
    for b in range(len(cu) - 1):
        s, e, b0, b1 = cu[b], cu[b + 1], qbo[b], qbo[b + 1]
        if e == s:
            continue
        tiles = tile_mask_from_lists(kv_num[:, b0:b1], kv_idx[:, b0:b1], b1 - b0)
        out[s:e] = _row_attention(q[s:e], k[s:e], v[s:e], tiles, block_size, scale).to(q.dtype)
    return out
