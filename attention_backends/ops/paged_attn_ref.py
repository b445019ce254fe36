"""Plain-torch paged attention of a cached step: the reference for the Triton kernel and its CPU path.

In a cached step (throughput mode) a row computes only a few of its canvas positions (the current
semi-AR block, or the block and everything after it); their queries attend to every key of the
row, read from the paged KV pool, where the fresh keys were written first.

Layout, for R rows of one layer:
  q           [T, Hq, D]   the fresh queries of all rows, packed; row r owns q[cu_q[r]:cu_q[r+1]]
                           at canvas positions q_start[r], q_start[r] + 1, ...
  k/v_cache   [num_pages, page_size, Hkv, D]
  page_table  int32 [R, max_pages]  key at canvas position p of row r: page page_table[r, p // page_size],
                                     slot p % page_size
  kv_len      int32 [R]    keys of row r: canvas positions 0 .. kv_len[r] - 1
Optional block pattern (SparseD after its selection), all rows of the call sharing `block_size`:
  q_block_offsets int32 [R+1]  row r's query blocks are entries q_block_offsets[r] + i of kv_num /
                               kv_idx, for i = 0 .. (last fresh position // block_size) - q_start[r] // block_size
  kv_num  int32 [Hq, NQ]        kept key blocks of each (head, query block)
  kv_idx  int32 [Hq, NQ, MAXK]  their indices (key block j = positions j*block_size ..), first kv_num valid
A query at canvas position p attends to the kept key blocks of its query block p // block_size
(the pattern's row), which is how SparseD's stored pattern reads for a subset of queries.
"""
from __future__ import annotations

import torch

from attention_backends.ops.block_sparse_attn_ref import tile_mask_from_lists


def gather_row_kv(cache: torch.Tensor, page_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hkv, D] keys (or values) of one row, gathered from its pages."""
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return cache[page_table_row.long()[pos // page_size], pos % page_size]


def paged_attention_ref(q, k_cache, v_cache, page_table, cu_q, q_start, kv_len, scale: float,
                        block_size: int | None = None, q_block_offsets=None, kv_num=None,
                        kv_idx=None) -> torch.Tensor:
    """Bidirectional attention of each row's fresh queries over its cached keys (all of them, or
    the kept tiles of each query's block when a pattern is given); float32 math, q's dtype out."""
    sparse = kv_num is not None
    if sparse and (block_size is None or q_block_offsets is None or kv_idx is None):
        raise ValueError("a block pattern needs block_size, q_block_offsets, kv_num and kv_idx")
    out = torch.empty_like(q)
    cu, starts, lens = cu_q.tolist(), q_start.tolist(), kv_len.tolist()
    hq = q.shape[1]
    for r in range(len(cu) - 1):
        s, e = cu[r], cu[r + 1]
        if e == s:
            continue
        n = lens[r]
        group = hq // k_cache.shape[2]
        k = gather_row_kv(k_cache, page_table[r], n).float().repeat_interleave(group, dim=1)
        v = gather_row_kv(v_cache, page_table[r], n).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale        # [Hq, Tq, n]
        if sparse:
            pos = torch.arange(starts[r], starts[r] + e - s, device=q.device)
            first = starts[r] // block_size
            b0 = int(q_block_offsets[r])
            b1 = b0 + int(pos[-1]) // block_size - first + 1
            nb = -(-n // block_size)
            tiles = tile_mask_from_lists(kv_num[:, b0:b1], kv_idx[:, b0:b1], nb)   # [Hq, nqb, nb]
            keys = tiles[:, pos // block_size - first]                                # [Hq, Tq, nb]
            keys = keys.repeat_interleave(block_size, dim=2)[..., :n]
            scores = scores.masked_fill(~keys, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)   # a query with no kept key -> zeros
        out[s:e] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out


def write_kv_ref(k_cache, v_cache, k, v, slots) -> None:
    """Store fresh keys and values: token i goes to flat slot slots[i] = page * page_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:])[slots.long()] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots.long()] = v.to(v_cache.dtype)
