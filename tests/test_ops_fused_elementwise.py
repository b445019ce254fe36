"""The fused elementwise kernels (compiled on a GPU, else the interpreter) == the torch references they replace on CUDA."""
import pytest
import torch
import torch.nn.functional as F

from model_executor.layers import fused_elementwise as fe
from model_executor.layers.rms_norm import RMSNorm
from model_executor.layers.rotary import apply_rotary_reference, rotary_cos_sin

from tests.kernel_env import DEVICE, KERNEL_DTYPES as DTYPES, tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dim", [64, 96])   # 96: not a power of two, the row is masked
def test_rms_norm_and_residual_add(dtype, bias, dim):
    g = torch.Generator().manual_seed(dim + bias)
    norm = RMSNorm(dim, 1e-5, bias=bias).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
        if bias:
            norm.bias.copy_(torch.randn(dim, generator=g))
    x = (3 * torch.randn(7, 5, dim, generator=g)).to(DEVICE, dtype)
    r = torch.randn(7, 5, dim, generator=g).to(DEVICE, dtype)
    # float32 reduction order / rsqrt: a last-place step of the output type at most
    t = tolerance(dtype, fp32=1e-5, fp16=2e-3, bf16=2e-2)
    tol = dict(atol=t, rtol=t)
    torch.testing.assert_close(fe.rms_norm(x, norm.weight, norm.bias, norm.eps), norm.reference(x), **tol)
    s, out = fe.rms_norm(x, norm.weight, norm.bias, norm.eps, residual=r)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(out, norm.reference(x + r), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("full_precision", [True, False])
@pytest.mark.parametrize("heads,head_dim", [(3, 64), (8, 32)])
def test_rotary(dtype, full_precision, heads, head_dim):
    g = torch.Generator().manual_seed(heads)
    x = torch.randn(11, heads, head_dim, generator=g).to(DEVICE, dtype)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 900, 4095, 5], device=DEVICE)   # packed rows restart at 0
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0)
    want = apply_rotary_reference(x, cos, sin, full_precision)
    got = fe.rotary(x, cos, sin, full_precision)
    assert got.dtype == dtype and got.is_contiguous()
    # fp fusion is off, so the products and sums round exactly as torch's do
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # a strided input (a view of a wider projection) gives the same
    wide = torch.cat([x, torch.randn(11, 1, head_dim, generator=g).to(DEVICE, dtype)], dim=1)
    torch.testing.assert_close(fe.rotary(wide[:, :heads], cos, sin, full_precision), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(0)
    gate = (4 * torch.randn(3, 2500, generator=g)).to(DEVICE, dtype)   # not a multiple of the block
    up = torch.randn(3, 2500, generator=g).to(DEVICE, dtype)
    t = tolerance(dtype, fp32=1e-6, fp16=1e-3, bf16=1e-2)
    tol = dict(atol=t, rtol=t)
    torch.testing.assert_close(fe.silu_mul(gate, up), F.silu(gate) * up, **tol)
