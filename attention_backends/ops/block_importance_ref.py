"""Plain-torch tile importance for SparseD's selection step: reference and CPU fallback.

imp_all[h, i, j]: softmax over all keys, summed over tile (query block i, key block j),
divided by block_size**2 (partial tiles count as zero-padded). imp_gen[h, i, j - gen_block]:
the same with the softmax over keys of blocks >= gen_block only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Query blocks per chunk: memory is O(chunk * block_size * L * Hq), never L x L.
_CHUNK_BLOCKS = 8


def _tile_sums(p: torch.Tensor, block_size: int) -> torch.Tensor:
    """p [H, c*bs, Lk] (query rows zero-padded to whole blocks) -> [H, c, ceil(Lk/bs)]."""
    h, rows, lk = p.shape
    nbk = -(-lk // block_size)
    p = F.pad(p, (0, nbk * block_size - lk))
    return p.view(h, rows // block_size, block_size, nbk, block_size).sum(dim=(2, 4))


def block_importance_ref(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                         gen_block: int, lse: torch.Tensor | None = None):
    """q [L, Hq, D], k [L, Hkv, D] of one row -> (imp_all [Hq, nb, nb], imp_gen [Hq, nb, nb-g]).

    `lse` [Hq, L] (natural log, over all keys of q.k*scale) skips recomputing the all-keys
    normaliser when the caller already has it from its dense pass.
    """
    length, hq, _ = q.shape
    nb = -(-length // block_size)
    qh = q.float().transpose(0, 1)
    kh = k.float().repeat_interleave(hq // k.shape[1], dim=1).transpose(0, 1)
    g0 = gen_block * block_size
    imp_all = torch.empty(hq, nb, nb, dtype=torch.float32, device=q.device)
    imp_gen = torch.empty(hq, nb, nb - gen_block, dtype=torch.float32, device=q.device)
    step = _CHUNK_BLOCKS * block_size
    for t0 in range(0, length, step):
        t1 = min(t0 + step, length)
        pad_rows = (0, 0, 0, -(-(t1 - t0) // block_size) * block_size - (t1 - t0))
        s = torch.einsum("hqd,hkd->hqk", qh[:, t0:t1], kh) * scale
        if lse is None:
            p_all = torch.softmax(s, dim=-1)
        else:
            p_all = torch.exp(s - lse[:, t0:t1, None].float())
        p_gen = torch.softmax(s[..., g0:], dim=-1)
        b0, b1 = t0 // block_size, -(-t1 // block_size)
        imp_all[:, b0:b1] = _tile_sums(F.pad(p_all, pad_rows), block_size)
        imp_gen[:, b0:b1] = _tile_sums(F.pad(p_gen, pad_rows), block_size)
    imp_all /= block_size ** 2
    imp_gen /= block_size ** 2
    return imp_all, imp_gen
