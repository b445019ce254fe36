"""Checks on the GPU that the log-sum-exp the dense SDPA kernels return (and that the selection
step reuses) equals torch.logsumexp of the scaled scores."""
import torch

from attention_backends.sdpa import dense_attention, dense_attention_lse

torch.manual_seed(0)
q, k, v = (torch.randn(1000, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out, lse = dense_attention_lse(q, k, v, 128 ** -0.5)
s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * 128 ** -0.5
err_lse = (lse - torch.logsumexp(s, -1)).abs().max().item()
err_out = (out.float() - dense_attention(q, k, v, 128 ** -0.5).float()).abs().max().item()
print(f"lse returned: {lse is not None}; max |lse - logsumexp| = {err_lse:.2e}; max |out - sdpa| = {err_out:.2e}")
assert err_lse < 1e-2 and err_out < 2e-2
