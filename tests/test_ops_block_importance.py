"""Tile importance: Triton kernel (compiled on a GPU, else the interpreter) == torch reference == naive full softmax."""
import pytest
import torch

from attention_backends.ops.block_importance import block_importance
from attention_backends.ops.block_importance_ref import block_importance_ref
from tests.kernel_env import DEVICE, KERNEL_DTYPES, tolerance

SCALE = 0.25


def naive_importance(q, k, block_size, gen_block):
    """Full L x L softmax per head, then a direct mean over each zero-padded tile."""
    length, hq, _ = q.shape
    nb = -(-length // block_size)
    kh = k.float().repeat_interleave(hq // k.shape[1], 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kh) * SCALE
    p_all = torch.softmax(s, -1)
    p_gen = torch.zeros_like(p_all)
    g0 = gen_block * block_size
    p_gen[..., g0:] = torch.softmax(s[..., g0:], -1)
    imp_all = torch.zeros(hq, nb, nb)
    imp_gen = torch.zeros(hq, nb, nb - gen_block)
    for i in range(nb):
        for j in range(nb):
            rows = slice(i * block_size, (i + 1) * block_size)
            cols = slice(j * block_size, (j + 1) * block_size)
            imp_all[:, i, j] = p_all[:, rows, cols].sum((1, 2)) / block_size ** 2
            if j >= gen_block:
                imp_gen[:, i, j - gen_block] = p_gen[:, rows, cols].sum((1, 2)) / block_size ** 2
    return imp_all, imp_gen


def inputs(length, hq, hkv, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Larger logits than N(0,1) so the softmax is peaked and the tiles differ clearly.
    q = (2 * torch.randn(length, hq, d, generator=gen)).to(dtype)
    k = torch.randn(length, hkv, d, generator=gen).to(dtype)
    return q, k


def full_lse(q, k):
    kh = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    return torch.logsumexp(torch.einsum("qhd,khd->hqk", q.float(), kh) * SCALE, -1)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Outputs the kernel allocates start as NaN, so an unwritten element cannot pass."""
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("length,block_size,gen_block", [(100, 16, 3), (100, 16, 0), (100, 16, 6),
                                                         (64, 32, 1), (200, 16, 10)])
def test_reference_matches_naive(length, block_size, gen_block, with_lse):
    q, k = inputs(length, 4, 2, 16, torch.float32, seed=length + gen_block)
    lse = full_lse(q, k) if with_lse else None
    got = block_importance_ref(q, k, SCALE, block_size, gen_block, lse=lse)
    for a, b in zip(got, naive_importance(q, k, block_size, gen_block)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


CASES = [  # length, block_size, gen_block, Hq, Hkv, D, block_m
    (100, 16, 3, 4, 2, 16, 128),
    (100, 16, 0, 2, 1, 32, 128),     # the whole row is the generation region
    (100, 16, 6, 2, 2, 16, 32),      # gen_block = nb - 1: one partial gen block
    (300, 16, 17, 2, 1, 16, 16),     # > 16 prompt key blocks: several accumulator chunks
    (77, 32, 1, 4, 4, 32, 64),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("length,block_size,gen_block,hq,hkv,d,block_m", CASES)
def test_kernel_matches_reference(poisoned_empty, dtype, length, block_size, gen_block, hq, hkv,
                                  d, block_m):
    q, k = (x.to(DEVICE) for x in inputs(length, hq, hkv, d, dtype, seed=length * 3 + d))
    got = block_importance(q, k, SCALE, block_size, gen_block, block_m=block_m)
    ref = block_importance_ref(q, k, SCALE, block_size, gen_block)
    # relative to the largest tile; fp16/bf16 inputs keep P in fp16 for the one-hot sums
    tol = tolerance(dtype, fp32=1e-5, fp16=2e-3, bf16=1e-2)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=tol * b.max().item(), rtol=tol)


@pytest.mark.parametrize("gen_block", [0, 4])
def test_kernel_with_caller_lse(poisoned_empty, gen_block):
    q, k = (x.to(DEVICE) for x in inputs(90, 4, 2, 16, torch.float32, seed=gen_block))
    lse = full_lse(q, k)
    got = block_importance(q, k, SCALE, 16, gen_block, lse=lse)
    ref = block_importance_ref(q, k, SCALE, 16, gen_block)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5 * b.max().item(), rtol=1e-5)


def test_rejects_bad_arguments():
    q, k = (x.to(DEVICE) for x in inputs(64, 2, 1, 16, torch.float32, seed=0))
    with pytest.raises(ValueError, match="gen_block"):
        block_importance(q, k, SCALE, 16, 4)
    with pytest.raises(ValueError, match="block_size"):
        block_importance(q, k, SCALE, 48, 0)
    with pytest.raises(ValueError, match="lse"):
        block_importance(q, k, SCALE, 16, 1, lse=torch.zeros(2, 63, device=DEVICE))
