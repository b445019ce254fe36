"""SparseD's pattern: choosing tiles from block importance, and the pattern's two encodings.

Stored form (the pool): one bit per (head, query block, key block), key blocks packed 8 to a byte
(key block j -> byte j // 8, bit j % 8). Kernel form: per (head, query block) the count and the
ascending list of kept key blocks.
"""
from __future__ import annotations

import torch


def generation_block(prompt_len: int, seq_len: int, block_size: int) -> int:
    """Index g of the first query block lying wholly inside the generated tokens (else the last)."""
    nb = -(-seq_len // block_size)
    return min(-(-prompt_len // block_size), nb - 1)


def select_tiles(imp_all: torch.Tensor, imp_gen: torch.Tensor, gen_block: int, select: float) -> torch.Tensor:
    """Union of the prompt-region and generation-region top-k tiles -> bool [H, nb, nb].

    imp_all: [H, nb, nb] importance under a softmax over all keys; imp_gen: [H, nb, nb - g]
    importance under a softmax over the generation keys only.
    """
    nb = imp_all.shape[-1]
    keep = torch.zeros(imp_all.shape, dtype=torch.bool, device=imp_all.device)
    k_all = min(int(nb * select) + 1, nb)  # beyond the blocks available: keep them all
    keep.scatter_(-1, imp_all.topk(k_all, dim=-1).indices, True)
    keep[..., gen_block:] = False  # the prompt region keeps what survives of the global top-k
    n_gen = nb - gen_block
    k_gen = min(int(n_gen * select) + 1, n_gen)
    keep[..., gen_block:].scatter_(-1, imp_gen.topk(k_gen, dim=-1).indices, True)
    return keep


def _top_by_mass(imp: torch.Tensor, mass: float, lo: float, hi: float) -> torch.Tensor:
    """bool like imp [..., n]: per row the fewest highest-importance blocks whose importance sums
    to at least `mass` of the row's total, their count clamped to [int(n*lo)+1, int(n*hi)+1] ∩ [1, n]."""
    n = imp.shape[-1]
    order = imp.sort(dim=-1, descending=True)
    csum = order.values.double().cumsum(-1)
    need = (csum < mass * csum[..., -1:]).sum(-1, keepdim=True) + 1    # fewest reaching the share
    count = need.clamp(min(int(n * lo) + 1, n), min(int(n * hi) + 1, n))
    ranked = torch.arange(n, device=imp.device) < count                # in importance order
    return torch.zeros_like(ranked).scatter_(-1, order.indices, ranked)


def select_tiles_by_mass(imp_all: torch.Tensor, imp_gen: torch.Tensor, gen_block: int, mass: float,
                         min_select: float, max_select: float) -> torch.Tensor:
    """Adaptive selection -> bool [H, nb, nb]: select_tiles with each (head, query block, region)
    keeping the fewest key blocks that carry `mass` of its importance instead of a fixed top-k.
    As in select_tiles, the prompt region keeps what survives (key block < g) of the choice made
    over all key blocks, and the generation region chooses among its own blocks."""
    keep = _top_by_mass(imp_all, mass, min_select, max_select)
    keep[..., gen_block:] = _top_by_mass(imp_gen, mass, min_select, max_select)
    return keep


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n / 8)]."""
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -n % 8))
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.uint8))
    return (padded.view(*mask.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> bool [..., n]."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :n]


def kv_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [H, nq, nk] -> (kv_num int32 [H, nq], kv_idx int32 [H, nq, max kv_num]) ascending per row."""
    num = mask.sum(-1, dtype=torch.int32)
    width = max(int(num.max()), 1)
    idx = torch.zeros(*mask.shape[:-1], width, dtype=torch.int32, device=mask.device)
    nz = mask.nonzero()  # row-major, so key blocks come out ascending within each (head, q block)
    flat_row = nz[:, 0] * mask.shape[1] + nz[:, 1]
    row_start = num.flatten().cumsum(0) - num.flatten()
    slot = torch.arange(nz.shape[0], device=mask.device) - row_start[flat_row]
    idx[nz[:, 0], nz[:, 1], slot] = nz[:, 2].to(torch.int32)
    return num, idx
