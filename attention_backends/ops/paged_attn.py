"""Paged attention of a cached step (Triton) and the fused K/V store; semantics and layout are
those of ops/paged_attn_ref.py.

A cached step has few fresh queries per row (a 32-token block, or block + suffix) against all
the row's keys (up to 64k), read through its page table. The work is planned on the host from
the small CPU metadata (cu_q, q_start, kv_len) and cut into (query tile, key split) pairs:
- a query tile is up to BLOCK_M consecutive fresh queries of one row inside one pattern query
  block (dense: any run of BLOCK_M), so a tile reads one list of kept key blocks;
- the tile's keys (dense: BLOCK_N-key tiles 0..kv_len-1; sparse: its kept key blocks) are cut
  into S splits (flash-decoding), so one long row still fills the GPU. Each split runs an
  online softmax (exp2, log2(e) folded into the scale, as ops/block_sparse_attn.py); with S > 1
  it writes its normalised output and log2-sum-exp, and a second kernel combines the splits.
Dense GQA: one program takes all query heads of a KV head (rows = heads x queries), so a K/V
tile is read once per group instead of once per head (a pattern is per head, so sparse never).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attention_backends.ops.block_sparse_attn import _update

LOG2E = 1.4426950408889634

# (BLOCK_N, num_warps, num_stages): the key tile and launch of the attention kernel; num_warps
# doubles for programs of MAX_ROWS rows (packed GQA) so the fp32 accumulator stays in registers.
# Not yet swept on a GPU (benchmarks/paged_attn.py times the alternatives in its SWEEP).
DEFAULT_CONFIG = (64, 4, 3)
MAX_ROWS = 128           # query rows (heads x queries) of one program
MIN_SPLIT_KEYS = 512     # a split shorter than this costs more in the combine than it gains
PLAN_FIELDS = 8          # int32 fields of one (tile, split) pair in the plan, see _plan


@triton.jit
def _paged_fwd(Q, K, V, O, OP, LSE, PLAN, PT, QBO, KV_NUM, KV_IDX,
               stride_qt, stride_qh, stride_ot, stride_oh,
               stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
               stride_pt, stride_nh, stride_ih, stride_iq, head_progs, qk_scale,
               HQ: tl.constexpr, GROUP: tl.constexpr, HPP: tl.constexpr, HPP_P: tl.constexpr,
               PAGE: tl.constexpr, EB: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, PREC: tl.constexpr):
    SUB: tl.constexpr = EB // BLOCK_N            # key tiles per entry (entry: a key block)
    ROWS: tl.constexpr = HPP_P * BLOCK_M
    pid = tl.program_id(0)
    h0 = (pid % head_progs) * HPP
    pair = pid // head_progs
    plan = PLAN + pair * 8
    row = tl.load(plan)
    tok0 = tl.load(plan + 1).to(tl.int64)
    n_q = tl.load(plan + 2)
    qb = tl.load(plan + 3)
    kv_len = tl.load(plan + 4)
    split = tl.load(plan + 5)
    n_split = tl.load(plan + 6)

    # Row i of the program: query head h0 + i // BLOCK_M, fresh query i % BLOCK_M of the tile.
    offs_r = tl.arange(0, ROWS)
    heads = h0 + offs_r // BLOCK_M
    head_ok = offs_r // BLOCK_M < HPP
    qi = offs_r % BLOCK_M
    q_ok = head_ok & (qi < n_q)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + (tok0 + qi)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    kvh = h0 // GROUP
    k_base = K + kvh * stride_kh + offs_d[None, :]
    v_base = V + kvh * stride_vh + offs_d[None, :]
    pt_row = PT + row.to(tl.int64) * stride_pt

    if SPARSE:
        qb = qb + tl.load(QBO + row)
        n = tl.load(KV_NUM + h0 * stride_nh + qb)
        idx = KV_IDX + h0 * stride_ih + qb.to(tl.int64) * stride_iq
        # Indices ascend, so a kept partial last block can only be the final entry.
        last = tl.load(idx + tl.maximum(n - 1, 0), mask=n > 0, other=-1)
    else:
        n = tl.cdiv(kv_len, EB)
        idx = KV_IDX
        last = n - 1
    per = tl.cdiv(n, n_split)
    e_lo = split * per
    e_hi = tl.minimum(n, e_lo + per)
    tail = (e_hi == n) & (e_lo < e_hi) & (last == (kv_len - 1) // EB) & (kv_len % EB != 0)
    n_whole = e_hi - tail.to(tl.int32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for it in range(e_lo * SUB, n_whole * SUB):
        if SPARSE:
            blk = tl.load(idx + it // SUB)
        else:
            blk = it // SUB
        kpos = blk * EB + (it % SUB) * BLOCK_N + offs_n
        page = tl.load(pt_row + kpos // PAGE).to(tl.int64)
        slot = (kpos % PAGE)[:, None]
        k = tl.load(k_base + page[:, None] * stride_kp + slot * stride_ks)
        v = tl.load(v_base + page[:, None] * stride_vp + slot * stride_vs)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        acc, m_i, l_i = _update(s, v, acc, m_i, l_i, qk_scale, offs_n, False, PREC)
    if tail:
        for start in range(last * EB, kv_len, BLOCK_N):
            kpos = start + offs_n
            key_ok = kpos < kv_len
            page = tl.load(pt_row + kpos // PAGE, mask=key_ok, other=0).to(tl.int64)
            slot = (kpos % PAGE)[:, None]
            k = tl.load(k_base + page[:, None] * stride_kp + slot * stride_ks,
                        mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + page[:, None] * stride_vp + slot * stride_vs,
                        mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            acc, m_i, l_i = _update(s, v, acc, m_i, l_i, qk_scale, key_ok, True, PREC)

    # No key at all (an empty kept list, an empty split) leaves l_i == 0, acc == 0: zeros.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if n_split == 1:
        tl.store(O + (tok0 + qi)[:, None] * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_ok[:, None])
    else:
        ws = (pair.to(tl.int64) * HQ + heads) * BLOCK_M + qi
        tl.store(OP + ws[:, None] * D + offs_d[None, :], out, mask=head_ok[:, None])
        has_key = l_i > 0.0
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        tl.store(LSE + ws, lse, mask=head_ok)


@triton.jit
def _combine_splits(O, OP, LSE, PLAN, COMB, stride_ot, stride_oh,
                    HQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the S partial softmax states of one (split tile, head) into its output."""
    pid = tl.program_id(0)
    h = pid % HQ
    pair0 = tl.load(COMB + pid // HQ)
    plan = PLAN + pair0 * 8
    tok0 = tl.load(plan + 1).to(tl.int64)
    n_q = tl.load(plan + 2)
    n_split = tl.load(plan + 6)
    qi = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s in range(n_split):
        ws = ((pair0 + s).to(tl.int64) * HQ + h) * BLOCK_M + qi
        lse = tl.load(LSE + ws)
        o = tl.load(OP + ws[:, None] * D + offs_d[None, :])
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all empty so far: weights 0
        alpha = tl.math.exp2(m - m_safe)
        beta = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + o * beta[:, None]
        w = w * alpha + beta
        m = m_new
    out = acc / tl.where(w > 0.0, w, 1.0)[:, None]
    tl.store(O + (tok0 + qi)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(qi < n_q)[:, None])


@triton.jit
def _write_kv(KC, VC, K, V, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_cp, stride_cs, stride_ch, stride_dp, stride_ds, stride_dh,
              PAGE: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = j < HD
    h = j // D
    d = j % D
    slot = tl.load(SLOTS + t).to(tl.int64)
    page = slot // PAGE
    off = slot % PAGE
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(KC + page * stride_cp + off * stride_cs + h * stride_ch + d,
             k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + page * stride_dp + off * stride_ds + h * stride_dh + d,
             v.to(VC.dtype.element_ty), mask=ok)


def _host_ints(x: torch.Tensor, name: str) -> list[int]:
    """Small metadata read on the host: CPU tensors cost nothing; a CUDA one costs a sync."""
    if x.dim() != 1 or x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {x.dtype} {tuple(x.shape)}")
    return x.tolist()


def _check(q, k_cache, v_cache, page_table, sparse, block_size, q_block_offsets, kv_num,
           kv_idx):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [T, Hq, D] and k/v_cache [num_pages, page_size, Hkv, D]; got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    hq, d = q.shape[1], q.shape[2]
    if k_cache.shape[3] != d or hq % k_cache.shape[2] != 0:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} "
                         f"(same D, Hq divisible by Hkv)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share one of fp16/bf16/fp32; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if any(x.stride(-1) != 1 for x in (q, k_cache, v_cache)):
        raise ValueError("q and the caches need a contiguous last dimension")
    if page_table.dim() != 2 or page_table.dtype != torch.int32 or page_table.stride(1) != 1:
        raise ValueError(f"page_table must be a row-contiguous int32 [R, max_pages], got "
                         f"{page_table.dtype} {tuple(page_table.shape)}")
    if any(x.device != q.device for x in (k_cache, v_cache, page_table)):
        raise ValueError(f"q, the caches and page_table must share a device; got {q.device}, "
                         f"{k_cache.device}, {v_cache.device}, {page_table.device}")
    if not sparse:
        return
    if block_size is None or q_block_offsets is None or kv_idx is None:
        raise ValueError("a block pattern needs block_size, q_block_offsets, kv_num and kv_idx")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    for name, x in (("q_block_offsets", q_block_offsets), ("kv_num", kv_num), ("kv_idx", kv_idx)):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    if kv_num.dim() != 2 or kv_num.shape[0] != hq or kv_idx.dim() != 3 \
            or kv_idx.shape[:2] != kv_num.shape:
        raise ValueError(f"kv_num must be [Hq={hq}, NQ] and kv_idx [Hq, NQ, MAXK]; got "
                         f"{tuple(kv_num.shape)} and {tuple(kv_idx.shape)}")
    if kv_num.stride(1) != 1 or kv_idx.stride(2) != 1:
        raise ValueError("kv_num and kv_idx need a contiguous last dimension")
    if kv_num.device != q.device or kv_idx.device != q.device:
        raise ValueError(f"kv_num and kv_idx must be on q's device {q.device}")


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU a few times over (each SM holds several of these programs)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4       # the interpreter: a few splits, so that CPU tests cover the combine


def _plan(cu, starts, lens, t, max_pages, page_size, block_size, rows_cap, heads_per_prog,
          head_progs, eb_dense, split_keys, target):
    """(int32 plan, number of pairs, number of split tiles, BLOCK_M).

    The plan holds PLAN_FIELDS ints per (tile, split) pair, pairs of one tile adjacent:
    row, first token, fresh queries, query block (local to the row), kv_len, split, splits;
    then the first pair of each tile with more than one split (the combine's list)."""
    n_rows = len(lens)
    if len(cu) != n_rows + 1 or len(starts) != n_rows or cu[0] != 0 or cu[-1] != t \
            or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_q must be R+1 ascending offsets from 0 to T={t} and q_start, kv_len "
                         f"R entries; got cu_q {cu}, q_start {starts}, kv_len {lens}")
    for r, (s, n) in enumerate(zip(starts, lens)):
        if s < 0 or n < 0 or n > max_pages * page_size:
            raise ValueError(f"row {r}: q_start {s} and kv_len {n} must be >= 0 and kv_len at most "
                             f"max_pages * page_size = {max_pages * page_size}")
    # Fresh query runs that each lie in one pattern query block (dense: the whole range).
    runs = []
    for r in range(n_rows):
        p, end, tok = starts[r], starts[r] + cu[r + 1] - cu[r], cu[r]
        first = p // block_size if block_size else 0
        while p < end:
            stop = min(end, (p // block_size + 1) * block_size) if block_size else end
            runs.append((r, tok, stop - p, (p // block_size - first) if block_size else 0))
            tok += stop - p
            p = stop
    longest = max((n for _, _, n, _ in runs), default=1)
    block_m = max(16, min(64, rows_cap // heads_per_prog, triton.next_power_of_2(longest)))
    tiles = [(r, tok + i, min(block_m, n - i), qb) for r, tok, n, qb in runs
             for i in range(0, n, block_m)]
    eb = block_size or eb_dense
    if split_keys is None:
        work = sum(lens[r] for r, *_ in tiles) * head_progs
        split_keys = (math.inf if len(tiles) * head_progs >= target
                      else max(MIN_SPLIT_KEYS, -(-work // target)))
    fields, comb = [], []
    for r, tok, nq, qb in tiles:
        n = lens[r]
        splits = 1 if split_keys is math.inf else max(1, min(-(-n // eb), -(-n // split_keys)))
        if splits > 1:
            comb.append(len(fields))
        fields += [(r, tok, nq, qb, n, s, splits, 0) for s in range(splits)]
    plan = torch.tensor([x for f in fields for x in f] + comb, dtype=torch.int32)
    return plan, len(fields), len(comb), block_m


class _RecentPlans:
    """The plans (and their device copies) of the last few distinct calls: every layer of a step
    passes the same metadata, and a step may hold a few calls (dense and sparse cached rows), so
    each plan is built (host work, one copy) once per step, not once per layer. Keyed on a copy of
    the metadata's values (a few ints per row), so an edit in place or a new tensor with other
    values builds afresh, inference tensors (which keep no version counter) included."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: list[tuple[tuple, object, object]] = []   # (tensors, params, plan), newest last

    def get(self, tensors, params, build):
        for i, (keys, p, value) in enumerate(self.entries):
            if p == params and len(keys) == len(tensors) and all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                    for a, b in zip(tensors, keys)):
                self.entries.append(self.entries.pop(i))
                return value
        value = build()                   # a failed build leaves nothing behind
        self.entries.append((tuple(x.clone() for x in tensors), params, value))
        del self.entries[:-self.size]
        return value


_PLANS = _RecentPlans()


def paged_attention(q, k_cache, v_cache, page_table, cu_q, q_start, kv_len, scale: float,
                    block_size: int | None = None, q_block_offsets=None, kv_num=None, kv_idx=None,
                    config=None, pack_gqa: bool | None = None, split_keys: int | None = None
                    ) -> torch.Tensor:
    """Each row's fresh queries over its paged keys (all, or the kept key blocks of each query's
    pattern block) -> o [T, Hq, D] in q's dtype.

    cu_q, q_start, kv_len are read on the host: pass CPU tensors (a CUDA one costs a sync).
    `config` overrides DEFAULT_CONFIG; `pack_gqa` (default: dense GQA with a group of at most 8)
    runs all query heads of a KV head in one program; `split_keys` overrides the keys per split
    (default: split long rows only as far as needed to fill the GPU).
    """
    sparse = kv_num is not None
    _check(q, k_cache, v_cache, page_table, sparse, block_size, q_block_offsets, kv_num, kv_idx)
    t, hq, d = q.shape
    hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    group = hq // hkv
    block_n, warps, stages = config or DEFAULT_CONFIG
    if pack_gqa is None:
        pack_gqa = group > 1 and group <= 8
    hpp = group if pack_gqa and not sparse else 1
    hpp_p = triton.next_power_of_2(hpp)
    if hpp_p * 16 > MAX_ROWS:
        raise ValueError(f"pack_gqa with a group of {group} query heads exceeds {MAX_ROWS} rows")
    eb = block_size if sparse else block_n
    block_n = min(block_n, eb)
    n_rows = kv_len.numel()
    if sparse and (q_block_offsets.dim() != 1 or q_block_offsets.numel() != n_rows + 1):
        raise ValueError(f"q_block_offsets must be [R+1={n_rows + 1}], got "
                         f"{tuple(q_block_offsets.shape)}")
    if page_table.shape[0] != n_rows:
        raise ValueError(f"page_table has {page_table.shape[0]} rows for {n_rows} rows of kv_len")
    head_progs = hq // hpp

    def build():
        cu, starts, lens = (_host_ints(x, name) for x, name in
                            ((cu_q, "cu_q"), (q_start, "q_start"), (kv_len, "kv_len")))
        plan, *rest = _plan(cu, starts, lens, t, page_table.shape[1], page_size,
                            block_size if sparse else None, MAX_ROWS, hpp_p, head_progs, eb,
                            split_keys, _target_programs(q.device))
        if q.is_cuda:
            plan = plan.pin_memory().to(q.device, non_blocking=True)
        return (plan, *rest)

    params = (t, hq, hpp, page_size, page_table.shape[1], block_size if sparse else None, eb,
              split_keys, q.device)
    plan, n_pairs, n_comb, block_m = _PLANS.get((cu_q, q_start, kv_len), params, build)
    o = torch.empty_like(q)
    if n_pairs == 0:
        return o
    if config is None and hpp_p * block_m >= MAX_ROWS:
        warps *= 2
    # Split tiles' partial outputs and log2-sum-exp, per pair (only when some tile splits).
    ws_pairs = n_pairs if n_comb else 0
    op = torch.empty(ws_pairs, hq, block_m, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(ws_pairs, hq, block_m, device=q.device, dtype=torch.float32)
    if sparse:
        qbo = q_block_offsets.to(q.device, non_blocking=True)
        nums, idxs = kv_num, kv_idx
    else:
        qbo = nums = idxs = page_table      # unread placeholders
    _paged_fwd[(n_pairs * head_progs,)](
        q, k_cache, v_cache, o, op, lse, plan, page_table, qbo, nums, idxs,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        nums.stride(0), idxs.stride(0) if sparse else 0, idxs.stride(1) if sparse else 0,
        head_progs, scale * LOG2E,
        HQ=hq, GROUP=group, HPP=hpp, HPP_P=hpp_p, PAGE=page_size, EB=eb, D=d, BLOCK_M=block_m,
        BLOCK_N=block_n, SPARSE=sparse, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    if n_comb:
        _combine_splits[(n_comb * hq,)](o, op, lse, plan, plan[n_pairs * PLAN_FIELDS:],
                                        o.stride(0), o.stride(1), HQ=hq, D=d, BLOCK_M=block_m,
                                        num_warps=4)
    return o


def write_kv(k_cache, v_cache, k, v, slots) -> None:
    """Store k, v [T, Hkv, D] at flat slots (page * page_size + offset) of the caches
    [num_pages, page_size, Hkv, D], converting to the cache dtype, in one launch."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k.dim() != 3 \
            or v.shape != k.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k, v must be [T, Hkv, D] and k/v_cache [num_pages, page_size, Hkv, D] "
                         f"with the same Hkv, D; got k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if slots.dim() != 1 or slots.numel() != k.shape[0] \
            or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [T={k.shape[0]}], got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    if any(x.stride(-1) != 1 for x in (k, v, k_cache, v_cache)):
        raise ValueError("k, v and the caches need a contiguous last dimension")
    if any(x.device != k_cache.device for x in (v_cache, k, v, slots)):
        raise ValueError(f"caches, k, v and slots must share a device; got {k_cache.device}, "
                         f"{v_cache.device}, {k.device}, {v.device}, {slots.device}")
    t, hkv, d = k.shape
    if t == 0:
        return
    hd = hkv * d
    block = min(1024, triton.next_power_of_2(hd))
    _write_kv[(t, triton.cdiv(hd, block))](
        k_cache, v_cache, k, v, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        PAGE=k_cache.shape[1], HD=hd, D=d, BLOCK=block, num_warps=4)
