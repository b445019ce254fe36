"""Tile importance for SparseD's selection step (Triton), never materialising L x L.

Pass 1 computes each query's log-sum-exp over the generation keys (blocks >= gen_block) and,
unless the caller passes it from its dense pass, over all keys. Pass 2 recomputes the scores
tile by tile, turns them into probabilities with those normalisers and sums each
(query block, key block) tile. The sum over keys and queries of a tile runs on the tensor cores:
p [queries, keys] @ onehot [keys, CHUNK] adds the tile's row sums into column j of a small
accumulator; the cross-warp reduction over queries then happens once per CHUNK key blocks.
Semantics: block_importance_ref.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
CHUNK = tl.constexpr(16)  # key blocks per accumulator (the one-hot matmul's N, >= 16 for tl.dot)


@triton.jit
def _scores(q, K, kpos, key_ok, stride_kt, offs_d, qk_scale, MASKED: tl.constexpr,
            PREC: tl.constexpr):
    """q [M, D] x keys at kpos -> scores in the log2 domain, masked keys at -inf."""
    if MASKED:
        k = tl.load(K + kpos[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None],
                    other=0.0)
    else:
        k = tl.load(K + kpos[:, None] * stride_kt + offs_d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _lse_kernel(Q, K, LSE_ALL, LSE_GEN, length, gen_start,
                stride_qt, stride_qh, stride_kt, stride_kh, qk_scale,
                HAS_LSE: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Row log2-sum-exp2 over gen keys [gen_start, L) and, unless HAS_LSE, over all keys."""
    h = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < length
    q = tl.load(Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    K = K + (h // GROUP) * stride_kh

    m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    if not HAS_LSE:
        for start in range(0, gen_start, BLOCK_N):
            s = _scores(q, K, start + offs_n, offs_n, stride_kt, offs_d, qk_scale, False, PREC)
            m_new = tl.maximum(m_p, tl.max(s, 1))
            l_p = l_p * tl.math.exp2(m_p - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_p = m_new
    m_g = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_g = tl.zeros([BLOCK_M], tl.float32)
    for start in range(gen_start, length, BLOCK_N):
        kpos = start + offs_n
        s = _scores(q, K, kpos, kpos < length, stride_kt, offs_d, qk_scale, True, PREC)
        m_new = tl.maximum(m_g, tl.max(s, 1))
        l_g = l_g * tl.math.exp2(m_g - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_g = m_new
    tl.store(LSE_GEN + h * length + offs_m, m_g + tl.math.log2(l_g), mask=q_ok)
    if not HAS_LSE:
        # Merge the prompt and gen partial sums (m_p = -inf, l_p = 0 when gen_start == 0).
        m_a = tl.maximum(m_p, m_g)
        l_a = l_p * tl.math.exp2(m_p - m_a) + l_g * tl.math.exp2(m_g - m_a)
        tl.store(LSE_ALL + h * length + offs_m, m_a + tl.math.log2(l_a), mask=q_ok)


@triton.jit
def _tile_sum_kernel(Q, K, LSE_ALL, LSE_GEN, IMP_ALL, IMP_GEN, length, nb, gen_block,
                     stride_qt, stride_qh, stride_kt, stride_kh, qk_scale, inv_area,
                     GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                     BLOCK_M: tl.constexpr, PREC: tl.constexpr, P_DTYPE: tl.constexpr):
    """Tile sums of exp2(s - lse) for BLOCK_M // BS query blocks against every key block."""
    QPB: tl.constexpr = BLOCK_M // BS
    h = tl.program_id(1)
    qb0 = tl.program_id(0) * QPB
    offs_m = qb0 * BS + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK)
    q_ok = offs_m < length
    q = tl.load(Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    # Padded query rows get lse = +inf, so their probabilities are exactly 0.
    lse_a = tl.load(LSE_ALL + h * length + offs_m, mask=q_ok, other=float("inf"))
    lse_g = tl.load(LSE_GEN + h * length + offs_m, mask=q_ok, other=float("inf"))
    K = K + (h // GROUP) * stride_kh
    qbs = qb0 + tl.arange(0, QPB)
    n_gen = nb - gen_block
    out_all = IMP_ALL + h * nb * nb + qbs[:, None] * nb
    out_gen = IMP_GEN + h * nb * n_gen + qbs[:, None] * n_gen

    # Prompt key blocks [0, gen_block): whole blocks inside the row, no key mask.
    for c0 in range(0, gen_block, CHUNK):
        acc = tl.zeros([BLOCK_M, CHUNK], tl.float32)
        for j in range(c0, tl.minimum(c0 + CHUNK, gen_block)):
            s = _scores(q, K, j * BS + offs_n, offs_n, stride_kt, offs_d, qk_scale, False, PREC)
            p = tl.math.exp2(s - lse_a[:, None]).to(P_DTYPE)
            onehot = tl.where(offs_c[None, :] == j - c0, 1.0, 0.0).to(P_DTYPE)
            acc = tl.dot(p, tl.broadcast_to(onehot, (BS, CHUNK)), acc, input_precision=PREC)
        imp = tl.sum(tl.reshape(acc, (QPB, BS, CHUNK)), 1) * inv_area
        cols = c0 + offs_c
        ok = (qbs[:, None] < nb) & (cols[None, :] < gen_block)
        tl.store(out_all + cols[None, :], imp, mask=ok)

    # Generation key blocks [gen_block, nb): both normalisers; the last block may be partial.
    for c0 in range(gen_block, nb, CHUNK):
        acc_a = tl.zeros([BLOCK_M, CHUNK], tl.float32)
        acc_g = tl.zeros([BLOCK_M, CHUNK], tl.float32)
        for j in range(c0, tl.minimum(c0 + CHUNK, nb)):
            kpos = j * BS + offs_n
            s = _scores(q, K, kpos, kpos < length, stride_kt, offs_d, qk_scale, True, PREC)
            onehot = tl.broadcast_to(
                tl.where(offs_c[None, :] == j - c0, 1.0, 0.0).to(P_DTYPE), (BS, CHUNK))
            p_a = tl.math.exp2(s - lse_a[:, None]).to(P_DTYPE)
            acc_a = tl.dot(p_a, onehot, acc_a, input_precision=PREC)
            p_g = tl.math.exp2(s - lse_g[:, None]).to(P_DTYPE)
            acc_g = tl.dot(p_g, onehot, acc_g, input_precision=PREC)
        cols = c0 + offs_c
        ok = (qbs[:, None] < nb) & (cols[None, :] < nb)
        tl.store(out_all + cols[None, :],
                 tl.sum(tl.reshape(acc_a, (QPB, BS, CHUNK)), 1) * inv_area, mask=ok)
        tl.store(out_gen + (cols - gen_block)[None, :],
                 tl.sum(tl.reshape(acc_g, (QPB, BS, CHUNK)), 1) * inv_area, mask=ok)


def block_importance(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
                     gen_block: int, lse: torch.Tensor | None = None,
                     block_m: int = 128, num_warps: int = 4, num_stages: int = 2):
    """q [L, Hq, D], k [L, Hkv, D] of one row -> (imp_all [Hq, nb, nb], imp_gen [Hq, nb, nb-g]).

    `lse` [Hq, L] (natural log over all keys of q.k*scale), if the caller has it from its
    dense pass, skips that half of pass 1. block_m / num_warps / num_stages: pass-2 tiling; the
    defaults (4 warps, 2 stages: two programs per SM) measured fastest on H200.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] \
            or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q must be [L, Hq, D] and k [L, Hkv, D] with Hq % Hkv == 0; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(f"q, k must share dtype fp16/bf16/fp32; got {q.dtype}, {k.dtype}")
    length, hq, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 128], got {block_size}")
    nb = -(-length // block_size)
    if not 0 <= gen_block < nb:
        raise ValueError(f"gen_block must be in [0, {nb}) for {length} tokens, got {gen_block}")
    if lse is not None and tuple(lse.shape) != (hq, length):
        raise ValueError(f"lse must be [Hq={hq}, L={length}], got {tuple(lse.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dimension")

    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    group = hq // k.shape[1]
    qk_scale = scale * LOG2E
    lse_gen = torch.empty(hq, length, dtype=torch.float32, device=q.device)
    lse_all = (lse.float() * LOG2E).contiguous() if lse is not None else torch.empty_like(lse_gen)
    _lse_kernel[(triton.cdiv(length, 128), hq)](
        q, k, lse_all, lse_gen, length, gen_block * block_size,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qk_scale,
        HAS_LSE=lse is not None, GROUP=group, D=d, BLOCK_M=128,
        BLOCK_N=min(64, block_size), PREC=prec, num_warps=num_warps)

    block_m = max(block_m, block_size)
    imp_all = torch.empty(hq, nb, nb, dtype=torch.float32, device=q.device)
    imp_gen = torch.empty(hq, nb, nb - gen_block, dtype=torch.float32, device=q.device)
    _tile_sum_kernel[(triton.cdiv(nb, block_m // block_size), hq)](
        q, k, lse_all, lse_gen, imp_all, imp_gen, length, nb, gen_block,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qk_scale, 1.0 / block_size ** 2,
        GROUP=group, BS=block_size, D=d, BLOCK_M=block_m, PREC=prec,
        # probabilities lie in [0, 1]: fp16 keeps 3 more mantissa bits than bf16
        P_DTYPE=tl.float32 if q.dtype == torch.float32 else tl.float16,
        num_warps=num_warps, num_stages=num_stages)
    return imp_all, imp_gen
