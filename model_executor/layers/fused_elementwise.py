"""Triton kernels for the per-token elementwise work around the linears, for CUDA.

RMSNorm (optionally right after the residual add), rotary embedding of q or k, and SwiGLU's
silu(gate) * up. The torch references (rms_norm.py, rotary.py, mlp.py) do each in several
full-size float32 passes (about 10 ms per LLaDA-8B layer at 64k tokens); these read and write
each activation once. They round to the activation dtype at the same points as the references
(which are the official models'), and launch with fp fusion off so that a multiply and an add
are not contracted into one FMA the references do not do. What can still differ is the last
bit of a float32 reduction order or of rsqrt/exp, which after the cast to bf16 rarely shows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _rms_norm_kernel(X, R, S, W, B, O, stride_x, stride_r, stride_s, stride_o, n_cols, eps,
                     HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One row: [s = x + r,] o = w * (s * rsqrt(mean(s^2) + eps)).to(dtype) [+ b]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # torch's x + r
        tl.store(S + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * inv).to(X.dtype.element_ty).to(tl.float32)  # normalised in fp32, cast back first
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * y).to(O.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + b).to(O.dtype.element_ty)
    tl.store(O + row * stride_o + cols, y, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None):
    """norm(x), or with `residual`: (x + residual, norm(x + residual)), over the last dim."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    r2 = residual.reshape(-1, n) if residual is not None else x2
    s2 = torch.empty_like(x2) if residual is not None else x2
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, s2, weight, bias if bias is not None else weight, out,
        x2.stride(0), r2.stride(0), s2.stride(0), out.stride(0), n, eps,
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16), **_NO_FMA)
    out = out.view(x.shape)
    return out if residual is None else (s2.view(x.shape), out)


@triton.jit
def _rotary_kernel(X, C, S, O, n_heads, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, FULL: tl.constexpr):
    """One token, BLOCK_H heads: o = x * cos + rotate_half(x) * sin ("rotate half" layout).

    FULL (LLaDA): in float32, one cast at the end. Otherwise (Dream/Qwen2): cos/sin cast to the
    dtype and each product and the sum rounded to it, as torch computes x * cos + r * sin there.
    """
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ok = (heads < n_heads)[:, None]
    src = X + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + HALF, mask=ok, other=0.0)
    c1 = tl.load(C + t * stride_ct + d)[None, :]
    c2 = tl.load(C + t * stride_ct + HALF + d)[None, :]
    s1 = tl.load(S + t * stride_ct + d)[None, :]
    s2 = tl.load(S + t * stride_ct + HALF + d)[None, :]
    dt = X.dtype.element_ty
    if FULL:
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (x1f * c1 + (-x2f) * s1).to(dt)
        o2 = (x2f * c2 + x1f * s2).to(dt)
    else:
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        c1, c2 = c1.to(dt).to(tl.float32), c2.to(dt).to(tl.float32)
        s1, s2 = s1.to(dt).to(tl.float32), s2.to(dt).to(tl.float32)
        o1 = ((x1f * c1).to(dt).to(tl.float32) + ((-x2f) * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)).to(dt)
    dst = O + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o1, mask=ok)
    tl.store(dst + HALF, o2, mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """x [T, H, D] rotated by the float32 angles cos/sin [T, D]; a new tensor of x's dtype."""
    t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(h), max(4096 // d, 1))
    _rotary_kernel[(t, triton.cdiv(h, block_h))](
        x, cos, sin, out, h, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
        HALF=d // 2, BLOCK_H=block_h, FULL=full_precision, num_warps=4, **_NO_FMA)
    return out


@triton.jit
def _silu_mul_kernel(G, U, O, n, BLOCK: tl.constexpr):
    """o = silu(g) * u, each rounded to the dtype as torch rounds F.silu(g) and then the product."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    dt = O.dtype.element_ty
    s = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(dt).to(tl.float32)
    tl.store(O + offs, (s * u).to(dt), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n, block = gate.numel(), 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=8, **_NO_FMA)
    return out
