"""Block-sparse attention: Triton kernel (compiled on a GPU, else the interpreter) == torch reference == naive masked softmax;
the FlexAttention path lists exactly the kept tiles and matches too."""
import pytest
import torch
import torch.nn.functional as F

from attention_backends.ops.block_sparse_attn import block_sparse_attention
from attention_backends.ops.block_sparse_attn_ref import (block_sparse_attention_ref,
                                                          tile_mask_from_lists)
from attention_backends.ops.flex_block_sparse import flex_block_sparse_attention, kernel_options, row_block_mask
from tests.kernel_env import DEVICE, KERNEL_DTYPES, tolerance

SCALE = 0.3


def random_pattern(lengths, block_size, hq, gen, allow_empty=False):
    """Random kept-tile lists with varied kv_num; unused kv_idx slots hold garbage (-5)."""
    nbs = [-(-n // block_size) for n in lengths]
    nq, maxk = sum(nbs), max(nbs)
    kv_num = torch.zeros(hq, nq, dtype=torch.int32)
    kv_idx = torch.full((hq, nq, maxk), -5, dtype=torch.int32)
    qb = 0
    for nb in nbs:
        for _ in range(nb):
            for h in range(hq):
                n = int(torch.randint(0 if allow_empty else 1, nb + 1, (), generator=gen))
                kv_num[h, qb] = n
                kv_idx[h, qb, :n] = torch.randperm(nb, generator=gen)[:n].sort().values.int()
            qb += 1
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).int()
    qbo = torch.tensor([0] + nbs, dtype=torch.int32).cumsum(0).int()
    return cu, qbo, kv_num, kv_idx


def random_qkv(total, hq, hkv, d, dtype, gen):
    return [torch.randn(total, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv)]


def naive_attention(q, k, v, cu, qbo, kv_num, kv_idx, block_size):
    """Direct full L x L masked softmax per row, the token mask built tile by tile."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    for b in range(len(cu) - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        mask = torch.zeros(hq, e - s, e - s, dtype=torch.bool)
        for h in range(hq):
            for i in range(int(qbo[b + 1] - qbo[b])):
                qb = int(qbo[b]) + i
                rows = slice(i * block_size, (i + 1) * block_size)
                for j in kv_idx[h, qb, :kv_num[h, qb]].tolist():
                    mask[h, rows, j * block_size:(j + 1) * block_size] = True
        qh = q[s:e].float().transpose(0, 1)
        kh = k[s:e].float().repeat_interleave(group, 1).transpose(0, 1)
        vh = v[s:e].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = (qh @ kh.transpose(1, 2) * SCALE).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        out[s:e] = (probs @ vh).transpose(0, 1)
    return out


@pytest.fixture
def poisoned_empty_like(monkeypatch):
    """Outputs the kernel allocates start as NaN, so an unwritten element cannot pass."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: real(x, **kw).fill_(float("nan")))


def test_tile_mask_from_lists():
    kv_num = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    kv_idx = torch.tensor([[[0, 2, 9], [7, 7, 7], [0, 1, 2]]], dtype=torch.int32)
    expect = torch.tensor([[[1, 0, 1], [0, 0, 0], [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(tile_mask_from_lists(kv_num, kv_idx, 3), expect)


@pytest.mark.parametrize("lengths,block_size", [([70, 45], 16), ([100, 0, 33], 32)])
def test_reference_matches_naive(lengths, block_size):
    gen = torch.Generator().manual_seed(1)
    cu, qbo, kv_num, kv_idx = random_pattern(lengths, block_size, 4, gen, allow_empty=True)
    q, k, v = random_qkv(sum(lengths), 4, 2, 16, torch.float32, gen)
    ref = block_sparse_attention_ref(q, k, v, cu, qbo, kv_num, kv_idx, block_size, SCALE)
    naive = naive_attention(q, k, v, cu, qbo, kv_num, kv_idx, block_size)
    torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)


CASES = [  # lengths, block_size, Hq, Hkv, D, kernel config (see DEFAULT_CONFIG), use_tma
    ([70, 45], 16, 4, 2, 16, None, False),
    ([77, 64], 32, 4, 1, 32, None, False),
    ([100, 0, 19], 32, 2, 2, 16, (16, 16, 4, 1), False),   # empty row; sub-tiles of a block
    ([70, 45], 32, 4, 2, 16, (32, 16, 4, 2), True),        # K/V through tensor descriptors
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("lengths,block_size,hq,hkv,d,config,use_tma", CASES)
def test_kernel_matches_reference(poisoned_empty_like, dtype, lengths, block_size, hq, hkv, d,
                                  config, use_tma):
    gen = torch.Generator().manual_seed(len(lengths) * 7 + d)
    cu, qbo, kv_num, kv_idx = random_pattern(lengths, block_size, hq, gen, allow_empty=True)
    args = [x.to(DEVICE) for x in (*random_qkv(sum(lengths), hq, hkv, d, dtype, gen), cu, qbo, kv_num, kv_idx)]
    out = block_sparse_attention(*args, block_size, SCALE, config=config, use_tma=use_tma)
    ref = block_sparse_attention_ref(*args, block_size, SCALE)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # fp32 runs exact-precision dots (ieee); fp16/bf16: P is rounded to the input type before P @ V
    tol = tolerance(dtype, fp32=1e-5, fp16=4e-3, bf16=3e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_kernel_all_tiles_is_dense_attention():
    gen = torch.Generator().manual_seed(3)
    length, bs = 90, 32
    nb = -(-length // bs)
    q, k, v = random_qkv(length, 4, 2, 32, torch.float32, gen)
    kv_num = torch.full((4, nb), nb, dtype=torch.int32)
    kv_idx = torch.arange(nb, dtype=torch.int32).expand(4, nb, nb).contiguous()
    cu = torch.tensor([0, length], dtype=torch.int32)
    qbo = torch.tensor([0, nb], dtype=torch.int32)
    out = block_sparse_attention(*(x.to(DEVICE) for x in (q, k, v, cu, qbo, kv_num, kv_idx)), bs, SCALE).cpu()
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), scale=SCALE).transpose(0, 1)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_kernel_empty_lists_write_zeros():
    gen = torch.Generator().manual_seed(4)
    cu, qbo, kv_num, kv_idx = random_pattern([40], 16, 2, gen)
    kv_num[1, 1] = 0
    q, k, v = random_qkv(40, 2, 2, 16, torch.float32, gen)
    out = block_sparse_attention(*(x.to(DEVICE) for x in (q, k, v, cu, qbo, kv_num, kv_idx)), 16, SCALE).cpu()
    assert torch.equal(out[16:32, 1], torch.zeros(16, 16))
    assert out[16:32, 0].abs().sum() > 0


def test_kernel_rejects_bad_inputs():
    q = torch.randn(32, 4, 16, device=DEVICE)
    k = torch.randn(32, 3, 16, device=DEVICE)
    cu = torch.tensor([0, 32], dtype=torch.int32, device=DEVICE)
    kv_num = torch.ones(4, 2, dtype=torch.int32, device=DEVICE)
    kv_idx = torch.zeros(4, 2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="Hq divisible"):
        block_sparse_attention(q, k, k, cu, cu, kv_num, kv_idx, 16, SCALE)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, q, q, cu, cu, kv_num, kv_idx, 24, SCALE)
    with pytest.raises(ValueError, match="kv_num"):
        block_sparse_attention(q, q, q, cu, cu, kv_num.long(), kv_idx, 16, SCALE)


def test_flex_block_mask_lists_each_kept_tile_once():
    gen = torch.Generator().manual_seed(5)
    cu, qbo, kv_num, kv_idx = random_pattern([70], 16, 3, gen, allow_empty=True)
    mask = row_block_mask(kv_num, kv_idx, 70, 16)
    full = tile_mask_from_lists(mask.full_kv_num_blocks[0], mask.full_kv_indices[0], 5)
    partial = tile_mask_from_lists(mask.kv_num_blocks[0], mask.kv_indices[0], 5)
    assert torch.equal(mask.to_dense()[0].bool(), tile_mask_from_lists(kv_num, kv_idx, 5))
    assert torch.equal(full | partial, tile_mask_from_lists(kv_num, kv_idx, 5))
    assert not (full & partial).any()          # never listed twice
    assert not partial[..., :4].any()          # partial only for the row's partial last block


@pytest.mark.parametrize("block_size,lengths", [(16, [70, 80, 75]), (64, [150, 192])])
def test_flex_matches_reference(block_size, lengths):
    # FlexAttention runs compiled on CPU too (its eager fallback ignores full blocks). Block 64
    # once failed on an H200 ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"):
    # the kernel's tiles now follow the mask's block size.
    gen = torch.Generator().manual_seed(6)
    cu, qbo, kv_num, kv_idx = random_pattern(lengths, block_size, 4, gen, allow_empty=True)
    args = [x.to(DEVICE) for x in (*random_qkv(sum(lengths), 4, 2, 16, torch.float32, gen), cu, qbo, kv_num, kv_idx)]
    out = flex_block_sparse_attention(*args, block_size, SCALE)
    ref = block_sparse_attention_ref(*args, block_size, SCALE)
    # compiled flex on CUDA may run its fp32 dots in TF32
    tol = 1e-5 if DEVICE.type == "cpu" else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_flex_gpu_tiles_divide_the_block():
    cuda = torch.device("cuda")
    for bs in (16, 32, 64):
        opts = kernel_options(bs, cuda)
        assert bs % opts["BLOCK_M"] == 0 and bs % opts["BLOCK_N"] == 0
    assert kernel_options(128, cuda) is None and kernel_options(64, torch.device("cpu")) is None
