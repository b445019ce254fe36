"""Which implementation runs SparseD's operations: Triton on CUDA, plain torch elsewhere.

Imports are lazy so that a machine without Triton still runs the torch path.
"""
from __future__ import annotations

import importlib.util

import torch


def _triton_ok(t: torch.Tensor) -> bool:
    return t.is_cuda and importlib.util.find_spec("triton") is not None


def block_sparse(q, k, v, cu_seqlens, q_block_offsets, kv_num, kv_idx, block_size, scale, kernel="auto"):
    if kernel == "auto":
        kernel = "triton" if _triton_ok(q) else "torch"
    if kernel == "triton":
        from attention_backends.ops.block_sparse_attn import block_sparse_attention as fn
    elif kernel == "flex":
        from attention_backends.ops.flex_block_sparse import flex_block_sparse_attention as fn
    else:
        from attention_backends.ops.block_sparse_attn_ref import block_sparse_attention_ref as fn
    return fn(q, k, v, cu_seqlens, q_block_offsets, kv_num, kv_idx, block_size, scale)


def importance(q, k, scale, block_size, gen_block, kernel="auto", lse=None):
    """(imp_all, imp_gen) of one row; FlexAttention has no importance op, so `flex` uses Triton."""
    if kernel in ("auto", "flex", "triton") and _triton_ok(q):
        from attention_backends.ops.block_importance import block_importance as fn
    else:
        from attention_backends.ops.block_importance_ref import block_importance_ref as fn
    return fn(q, k, scale, block_size, gen_block, lse=lse)


def pattern_lists(bits, nk: int, width: int, kernel="auto"):
    """(kv_num [H, nq], kv_idx [H, nq, width]) of a stored pattern, packed uint8 [H, nq, ceil(nk/8)]."""
    if kernel in ("auto", "flex", "triton") and _triton_ok(bits):
        from attention_backends.ops.pattern_lists import pattern_lists as fn
        return fn(bits, nk, width)
    from attention_backends.sparsed_pattern import kv_lists, unpack_bits
    num, idx = kv_lists(unpack_bits(bits, nk))
    return num, torch.nn.functional.pad(idx, (0, width - idx.shape[-1]))


def paged_attention(q, k_cache, v_cache, page_table, cu_q, q_start, kv_len, scale, block_size=None,
                    q_block_offsets=None, kv_num=None, kv_idx=None, kernel="auto"):
    """A cached step's attention over the paged KV pool (layout in ops/paged_attn_ref.py)."""
    if kernel in ("auto", "flex", "triton") and _triton_ok(q):
        from attention_backends.ops.paged_attn import paged_attention as fn
    else:
        from attention_backends.ops.paged_attn_ref import paged_attention_ref as fn
    return fn(q, k_cache, v_cache, page_table, cu_q, q_start, kv_len, scale, block_size,
              q_block_offsets, kv_num, kv_idx)


def write_kv(k_cache, v_cache, k, v, slots, kernel="auto"):
    """Store fresh keys and values at flat slots (page * page_size + offset) of the paged pool."""
    if kernel in ("auto", "flex", "triton") and _triton_ok(k):
        from attention_backends.ops.paged_attn import write_kv as fn
    else:
        from attention_backends.ops.paged_attn_ref import write_kv_ref as fn
    fn(k_cache, v_cache, k, v, slots)
