"""Paged attention of a cached step and the K/V store: the Triton kernels (compiled on a GPU,
else the interpreter) == the plain-torch reference; the reference itself == dense SDPA and the
block-sparse reference on the same keys laid out contiguously."""
import pytest
import torch
import torch.nn.functional as F

from attention_backends.ops.block_sparse_attn_ref import block_sparse_attention_ref
from attention_backends.ops.paged_attn import _plan, paged_attention, write_kv
from attention_backends.ops.paged_attn_ref import paged_attention_ref, write_kv_ref
from tests.kernel_env import BF16, DEVICE, tolerance

SCALE = 0.3


def paged_case(rows, hq, hkv, d, page_size, dtype, gen, spare_pages=3):
    """rows: (q_start, fresh queries, kv_len) each. Random caches and queries; each row's pages
    are a random permutation of the pool, its page-table tail holds garbage (-1)."""
    need = [-(-n // page_size) for _, _, n in rows]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).int()
    page_table = torch.full((len(rows), max(need + [1]) + 1), -1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(need):
        page_table[r, :n] = perm[used:used + n]
        used += n
    k_cache, v_cache = (torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
                        for _ in range(2))
    counts = [nq for _, nq, _ in rows]
    q = torch.randn(sum(counts), hq, d, generator=gen).to(dtype)
    cu_q = torch.tensor([0] + counts).cumsum(0).int()
    q_start = torch.tensor([s for s, _, _ in rows], dtype=torch.int32)
    kv_len = torch.tensor([n for _, _, n in rows], dtype=torch.int32)
    return q, k_cache, v_cache, page_table, cu_q, q_start, kv_len


def random_pattern(rows, block_size, hq, gen):
    """Kept key-block lists for each fresh query block of each row: varied counts, some empty;
    unused kv_idx slots hold garbage (-5)."""
    nqb = [0 if nq == 0 else (s + nq - 1) // block_size - s // block_size + 1 for s, nq, _ in rows]
    nbs = [-(-n // block_size) for _, _, n in rows]
    kv_num = torch.zeros(hq, sum(nqb), dtype=torch.int32)
    kv_idx = torch.full((hq, sum(nqb), max(nbs)), -5, dtype=torch.int32)
    qb = 0
    for nq, nb in zip(nqb, nbs):
        for _ in range(nq):
            for h in range(hq):
                n = int(torch.randint(0, nb + 1, (), generator=gen))
                kv_num[h, qb] = n
                kv_idx[h, qb, :n] = torch.randperm(nb, generator=gen)[:n].sort().values.int()
            qb += 1
    return torch.tensor([0] + nqb).cumsum(0).int(), kv_num, kv_idx


def on_device(case):
    """q, caches, page table (and a pattern) on the kernel's device; cu_q, q_start, kv_len stay
    on the CPU, as the backend passes them."""
    q, k_cache, v_cache, page_table, *meta = case
    return [x.to(DEVICE) for x in (q, k_cache, v_cache, page_table)] + meta


# rows (q_start, fresh, kv_len): unaligned starts, a range across two query blocks, an empty row,
# kv_len not a multiple of the page size or the block size
ROWS = [(37, 20, 90), (0, 0, 40), (50, 30, 131), (5, 3, 21)]
CASES = [  # rows, Hq, Hkv, page_size, block_size (None: dense), split_keys (None: default)
    (ROWS, 4, 2, 16, None, None),
    (ROWS, 4, 2, 16, None, 32),          # many splits, the combine kernel
    (ROWS, 2, 2, 64, None, 16),
    (ROWS, 4, 2, 16, 32, None),
    (ROWS, 4, 2, 64, 16, 16),
    ([(100, 40, 150)], 2, 2, 16, 32, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("rows,hq,hkv,page_size,block_size,split_keys", CASES)
def test_kernel_matches_reference(dtype, rows, hq, hkv, page_size, block_size, split_keys):
    gen = torch.Generator().manual_seed(hq * 100 + page_size + (block_size or 0))
    args = on_device(paged_case(rows, hq, hkv, 16, page_size, dtype, gen))
    pattern = {}
    if block_size:
        qbo, kv_num, kv_idx = random_pattern(rows, block_size, hq, gen)
        pattern = dict(block_size=block_size, q_block_offsets=qbo, kv_num=kv_num.to(DEVICE),
                       kv_idx=kv_idx.to(DEVICE))
    out = paged_attention(*args, SCALE, **pattern, split_keys=split_keys)
    ref = paged_attention_ref(*args, SCALE, **pattern)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = tolerance(dtype, fp32=1e-5, fp16=4e-3, bf16=3e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("pack_gqa", [False, True])
def test_gqa_packing_and_plain_heads_agree(pack_gqa):
    gen = torch.Generator().manual_seed(2)
    args = on_device(paged_case([(3, 9, 70), (64, 33, 100)], 6, 2, 16, 16, torch.float32, gen))
    out = paged_attention(*args, SCALE, pack_gqa=pack_gqa, split_keys=32)
    torch.testing.assert_close(out, paged_attention_ref(*args, SCALE), atol=1e-5, rtol=1e-5)


def test_plan_is_reused_for_the_same_metadata_and_rebuilt_when_it_changes():
    # the layers of a step share one plan; an in-place edit of the metadata must not reuse it
    gen = torch.Generator().manual_seed(8)
    q, kc, vc, pt, cu, qs, kl = on_device(paged_case([(10, 20, 60), (0, 5, 33)], 2, 2, 16, 16,
                                                     torch.float32, gen))
    for _ in range(2):
        out = paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE, split_keys=16)
        torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, pt, cu, qs, kl, SCALE))
    kl[0] = 47
    qs[1] = 20
    out = paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE, split_keys=16)
    torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, pt, cu, qs, kl, SCALE))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU synchronisation")
def test_no_gpu_sync_with_host_metadata():
    gen = torch.Generator().manual_seed(9)
    rows = [(37, 20, 90), (50, 30, 131)]
    args = on_device(paged_case(rows, 4, 2, 16, 16, torch.float16, gen))
    qbo, kv_num, kv_idx = random_pattern(rows, 32, 4, gen)
    pattern = (32, qbo, kv_num.to(DEVICE), kv_idx.to(DEVICE))
    for extra in ((), pattern):          # first calls compile, outside the checked region
        paged_attention(*args, SCALE, *extra, split_keys=32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for extra in ((), pattern):
            paged_attention(*args, SCALE, *extra, split_keys=32)
            paged_attention(*args, SCALE, *extra)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_empty_kept_lists_write_zeros():
    gen = torch.Generator().manual_seed(3)
    rows = [(16, 32, 80)]
    args = on_device(paged_case(rows, 2, 2, 16, 16, torch.float32, gen))
    qbo, kv_num, kv_idx = random_pattern(rows, 16, 2, gen)
    kv_num[0, 1], kv_num[1, 1] = 0, 3
    kv_num[1, 0] = 2
    out = paged_attention(*args, SCALE, 16, qbo, kv_num.to(DEVICE), kv_idx.to(DEVICE),
                          split_keys=16).cpu()
    assert torch.equal(out[16:32, 0], torch.zeros(16, 16))
    assert out[16:32, 1].abs().sum() > 0 and out[:16, 1].abs().sum() > 0


def test_plan_tiles_stay_in_one_query_block_and_splits_cover_rows():
    # row 0: positions 37..56 with blocks of 16 -> runs 37-47, 48-56; row 2 empty
    cu, starts, lens = [0, 20, 52, 52], [37, 90, 0], [60, 300, 10]
    plan, n_pairs, n_comb, block_m = _plan(cu, starts, lens, 52, 32, 16, 16, 128, 1, 4, 16,
                                           split_keys=100, target=1)
    pairs = plan[:n_pairs * 8].view(n_pairs, 8).tolist()
    tiles = sorted({(p[0], p[1], p[2], p[3], p[6]) for p in pairs})   # row, token, queries, block, splits
    assert block_m == 16
    assert tiles == [(0, 0, 11, 0, 1), (0, 11, 9, 1, 1), (1, 20, 6, 0, 3), (1, 26, 16, 1, 3),
                     (1, 42, 10, 2, 3)]
    assert plan[n_pairs * 8:].tolist() == [i for i, p in enumerate(pairs) if p[5] == 0 and p[6] > 1]
    assert n_comb == 3


def test_no_fresh_queries_is_an_empty_output():
    gen = torch.Generator().manual_seed(10)
    args = on_device(paged_case([(0, 0, 30), (5, 0, 9)], 2, 2, 16, 16, torch.float32, gen))
    assert paged_attention(*args, SCALE).shape == (0, 2, 16)


def test_write_kv_matches_reference():
    gen = torch.Generator().manual_seed(4)
    caches = [torch.randn(5, 16, 2, 16, generator=gen).to(DEVICE) for _ in range(2)]
    k, v = (torch.randn(7, 3, 16, generator=gen)[:, 1:].to(DEVICE) for _ in range(2))  # strided tokens
    slots = torch.randperm(80, generator=gen)[:7].to(DEVICE)
    expect = [c.clone() for c in caches]
    write_kv_ref(*expect, k, v, slots)
    write_kv(*caches, k, v, slots.int())
    assert all(torch.equal(a, b) for a, b in zip(caches, expect))


def test_write_kv_converts_to_the_cache_dtype():
    caches = [torch.zeros(2, 16, 1, 16, dtype=torch.float16, device=DEVICE) for _ in range(2)]
    k = torch.randn(3, 1, 16, device=DEVICE)
    slots = torch.tensor([31, 0, 17], device=DEVICE)
    write_kv(*caches, k, -k, slots)
    flat = caches[0].view(-1, 1, 16)
    assert torch.equal(flat[slots], k.half()) and torch.equal(caches[1].view(-1, 1, 16)[slots], -k.half())


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, pt, cu, qs, kl = on_device(paged_case([(0, 4, 20)], 3, 2, 16, 16, torch.float32, gen))
    with pytest.raises(ValueError, match="Hq divisible"):
        paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE)
    q = q[:, :2].contiguous()
    with pytest.raises(ValueError, match="kv_len"):
        paged_attention(q, kc, vc, pt, cu, qs, torch.tensor([10 ** 6], dtype=torch.int32), SCALE)
    with pytest.raises(ValueError, match="cu_q"):
        paged_attention(q, kc, vc, pt, torch.tensor([0, 3], dtype=torch.int32), qs, kl, SCALE)
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(q, kc, vc, pt.long(), cu, qs, kl, SCALE)
    with pytest.raises(ValueError, match="block_size"):
        kv_num = torch.ones(2, 1, dtype=torch.int32, device=DEVICE)
        paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE, 24, cu, kv_num, kv_num[..., None])
    with pytest.raises(ValueError, match="slots"):
        write_kv(kc, vc, kc[0, :3], vc[0, :3], torch.zeros(2, dtype=torch.int32, device=DEVICE))


# The reference itself, against independent restatements (torch only, no kernels).

def test_reference_dense_is_sdpa_over_the_gathered_row():
    gen = torch.Generator().manual_seed(6)
    q, kc, vc, pt, cu, qs, kl = paged_case([(30, 12, 75)], 4, 2, 16, 16, torch.float32, gen)
    pos = torch.arange(75)
    k, v = (c[pt[0].long()[pos // 16], pos % 16].repeat_interleave(2, 1).transpose(0, 1)
            for c in (kc, vc))
    expect = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, scale=SCALE).transpose(0, 1)
    torch.testing.assert_close(paged_attention_ref(q, kc, vc, pt, cu, qs, kl, SCALE), expect,
                               atol=1e-5, rtol=1e-5)


def test_reference_sparse_is_the_block_sparse_rows_of_the_fresh_queries():
    # The fresh queries of a cached step read what the same queries read in a full sparse pass.
    gen = torch.Generator().manual_seed(7)
    n, bs, s, nq = 90, 16, 21, 30
    q, kc, vc, pt, _, _, kl = paged_case([(0, n, n)], 4, 2, 16, 16, torch.float32, gen)
    full_qbo, kv_num, kv_idx = random_pattern([(0, n, n)], bs, 4, gen)
    pos = torch.arange(n)
    k, v = (c[pt[0].long()[pos // 16], pos % 16] for c in (kc, vc))
    full = block_sparse_attention_ref(q, k, v, torch.tensor([0, n], dtype=torch.int32), full_qbo,
                                      kv_num, kv_idx, bs, SCALE)
    blocks = slice(s // bs, (s + nq - 1) // bs + 1)
    fresh = paged_attention_ref(q[s:s + nq], kc, vc, pt, torch.tensor([0, nq], dtype=torch.int32),
                                torch.tensor([s], dtype=torch.int32), kl, SCALE, bs,
                                torch.tensor([0, blocks.stop - blocks.start], dtype=torch.int32),
                                kv_num[:, blocks].contiguous(), kv_idx[:, blocks].contiguous())
    torch.testing.assert_close(fresh, full[s:s + nq], atol=1e-5, rtol=1e-5)


def test_plan_accepts_inference_tensors_and_keys_on_values():
    # the engine builds the host metadata under inference_mode (no version counter to key on);
    # a new tensor with other values, or an in-place edit there, must rebuild the plan
    gen = torch.Generator().manual_seed(10)
    q, kc, vc, pt, cu, qs, kl = on_device(paged_case([(10, 20, 60), (3, 5, 33)], 2, 2, 16, 16,
                                                     torch.float32, gen))
    with torch.inference_mode():
        cu, qs, kl = cu.clone(), qs.clone(), kl.clone()
        for _ in range(2):
            out = paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE, split_keys=16)
            torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, pt, cu, qs, kl, SCALE))
        kl[0] = 47
        out = paged_attention(q, kc, vc, pt, cu, qs, kl, SCALE, split_keys=16)
        torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, pt, cu, qs, kl, SCALE))


def test_alternating_calls_of_a_step_each_build_their_plan_once(monkeypatch):
    # a step with dense and sparse cached rows makes two calls per layer: neither may rebuild per layer
    import attention_backends.ops.paged_attn as pa
    built = []
    real = pa._plan
    monkeypatch.setattr(pa, "_plan", lambda *a, **kw: built.append(1) or real(*a, **kw))
    monkeypatch.setattr(pa, "_PLANS", pa._RecentPlans())
    gen = torch.Generator().manual_seed(11)
    a = on_device(paged_case([(10, 20, 60)], 2, 2, 16, 16, torch.float32, gen))
    b = on_device(paged_case([(3, 9, 40), (0, 5, 33)], 2, 2, 16, 16, torch.float32, gen))
    for _ in range(3):   # three "layers"
        for args in (a, b):
            torch.testing.assert_close(paged_attention(*args, SCALE, split_keys=16),
                                       paged_attention_ref(*args, SCALE))
    assert len(built) == 2
