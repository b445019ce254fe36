"""The dense attention wrappers against a plain softmax: the output, and the log-sum-exp that the
selection step reuses (returned only where a CUDA kernel gives it, and then right)."""
import pytest
import torch

from attention_backends.sdpa import dense_attention, dense_attention_lse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])


def _reference(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v), s.logsumexp(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("length", [21, 130])
def test_dense_attention_and_its_lse_match_a_plain_softmax(dtype, heads, length):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(length, h, 64, generator=g).to(DEVICE, dtype) for h in (heads[0], heads[1], heads[1]))
    scale = 64 ** -0.5
    want, want_lse = _reference(q, k, v, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out, lse = dense_attention_lse(q, k, v, scale)
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(dense_attention(q, k, v, scale).float(), want, atol=tol, rtol=tol)
    if lse is not None:   # float32 (the cuDNN op returned garbage for it) or no CUDA kernel: None
        assert dtype != torch.float32
        torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
