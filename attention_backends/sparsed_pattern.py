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
