"""The fused elementwise kernels (model_executor/layers/fused_elementwise.py) against the torch
references they replace, at LLaDA-8B shapes on one GPU: agreement (share of outputs bitwise equal,
largest difference) and time (triton.testing.do_bench, median).

    python -m benchmarks.elementwise [--tokens 32768 65536] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from model_executor.layers import fused_elementwise as fe
from model_executor.layers.rms_norm import RMSNorm
from model_executor.layers.rotary import apply_rotary_reference, rotary_cos_sin

D_MODEL, HEADS, HEAD_DIM, MLP = 4096, 32, 128, 12288   # LLaDA-8B


def cases(t: int, dev):
    """(name, reference fn, fused fn, calls per layer) at t tokens."""
    g = torch.Generator(dev).manual_seed(t)
    bf = dict(device=dev, dtype=torch.bfloat16)
    x = torch.randn(t, D_MODEL, generator=g, **bf)
    r = torch.randn(t, D_MODEL, generator=g, **bf)
    norm = RMSNorm(D_MODEL, 1e-5).to(**bf)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D_MODEL, generator=g, **bf))
    q = torch.randn(t, HEADS, HEAD_DIM, generator=g, **bf)
    cos, sin = rotary_cos_sin(torch.arange(t, device=dev), HEAD_DIM, 500000.0)
    gate = torch.randn(t, MLP, generator=g, **bf)
    up = torch.randn(t, MLP, generator=g, **bf)
    w, eps = norm.weight, norm.eps
    return [
        ("rms_norm", lambda: norm.reference(x), lambda: fe.rms_norm(x, w, None, eps), 1),
        ("residual add + rms_norm", lambda: (x + r, norm.reference(x + r)),
         lambda: fe.rms_norm(x, w, None, eps, residual=r), 1),
        ("rotary fp32 (LLaDA), q or k", lambda: apply_rotary_reference(q, cos, sin, True),
         lambda: fe.rotary(q, cos, sin, True), 2),
        ("rotary in dtype (Dream)", lambda: apply_rotary_reference(q, cos, sin, False),
         lambda: fe.rotary(q, cos, sin, False), 0),
        ("silu(gate) * up", lambda: F.silu(gate) * up, lambda: fe.silu_mul(gate, up), 1),
    ]


def agreement(a, b) -> tuple[float, float]:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    equal = sum((x == y).sum().item() for x, y in zip(a, b)) / sum(x.numel() for x in a)
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    return equal, diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    lines = [f"Card: {card}; torch {torch.__version__}; bf16, LLaDA-8B shapes (d_model {D_MODEL}, "
             f"{HEADS}x{HEAD_DIM} heads, MLP {MLP}).", "",
             "| tokens | op | torch reference (ms) | fused (ms) | speedup | outputs bitwise equal | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for t in args.tokens:
        saved = 0.0
        for name, ref, fused, per_layer in cases(t, dev):
            equal, diff = agreement(ref(), fused())
            t_ref, t_fused = do_bench(ref, return_mode="median"), do_bench(fused, return_mode="median")
            saved += per_layer * (t_ref - t_fused)
            lines.append(f"| {t} | {name} | {t_ref:.3f} | {t_fused:.3f} | {t_ref / t_fused:.1f}x | "
                         f"{100 * equal:.4f}% | {diff:.3g} |")
            print(lines[-1], flush=True)
        lines.append(f"| {t} | saved per LLaDA layer (norm, add+norm, rotary q and k, silu*up) | | | "
                     f"{saved:.2f} ms | | |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "elementwise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
