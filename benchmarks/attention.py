"""One attention layer on a GPU: dense SDPA (cuDNN, flash), FlexAttention over the kept tiles,
our Triton block-sparse kernel, and the selection step (tile importance + top-k).

Checks every path against the torch references on small shapes first, then times
(triton.testing.do_bench, median) 32 heads x 128 in bf16, non-causal, block_size 128.
TFLOP/s count only the tiles computed: 4 * kept_tiles * block_size**2 * head_dim.
Writes attention_results.md (and attention.png when matplotlib is present) to --out.

  python benchmarks/attention.py [--sizes 16384,32768,65536] [--densities 0.1,0.3,0.5] [--sweep]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_backends.ops.block_importance import block_importance  # noqa: E402
from attention_backends.ops.block_importance_ref import block_importance_ref  # noqa: E402
from attention_backends.ops.block_sparse_attn import (DEFAULT_CONFIG,  # noqa: E402
                                                      block_sparse_attention)
from attention_backends.ops.block_sparse_attn_ref import block_sparse_attention_ref  # noqa: E402
from attention_backends.ops.flex_block_sparse import (compiled_flex_attention,  # noqa: E402
                                                      flex_block_sparse_attention, row_block_mask)

HEADS, DIM, BS, DTYPE = 32, 128, 128, torch.bfloat16
SCALE = DIM ** -0.5
# Kernel variants tried by --sweep: (DEFAULT_CONFIG fields, use_tma).
SWEEP = [((128, 128, 8, 3), True), ((128, 128, 8, 3), False), ((128, 128, 8, 2), True),
         ((128, 64, 8, 3), True), ((128, 64, 8, 4), True), ((64, 64, 4, 3), False)]
# Importance pass-2 variants tried by --sweep: (num_warps, num_stages).
IMP_SWEEP = [(4, 2), (8, 3), (8, 2), (4, 3)]


def log(*a):
    print(*a, flush=True)


def ms(fn, rep=300):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def pattern(h, nb, density, device, gen=None):
    """SparseD-like lists: every (head, query block) keeps int(nb*density)+1 random key blocks."""
    n = min(nb, int(nb * density) + 1)
    idx = torch.rand(h, nb, nb, device=device, generator=gen).argsort(-1)[..., :n]
    kv_idx = F.pad(idx.sort(-1).values, (0, nb - n)).int().contiguous()
    return torch.full((h, nb), n, dtype=torch.int32, device=device), kv_idx


def packed(lengths, hq, hkv, d, dtype, density, bs, device):
    nbs = [-(-n // bs) for n in lengths]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).int()
    qbo = torch.tensor([0] + nbs, device=device).cumsum(0).int()
    parts = [pattern(hq, nb, density, device) for nb in nbs]
    maxk = max(nbs)
    kv_num = torch.cat([p[0] for p in parts], 1)
    kv_idx = torch.cat([F.pad(p[1], (0, maxk - p[1].shape[2])) for p in parts], 1)
    qkv = [torch.randn(sum(lengths), h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv)]
    return qkv, cu, qbo, kv_num, kv_idx


def check_attention(device, config=None, use_tma=None):
    """Kernel (and Flex once) vs the torch reference on small packed bf16 shapes."""
    cases = [([1000, 1010], 128, 8, 2, 128)]
    if config is None:
        cases.append(([300, 200], 32, 4, 4, 64))
    for lengths, bs, hq, hkv, d in cases:
        for density in (0.3, 1.0):
            (q, k, v), cu, qbo, kv_num, kv_idx = packed(lengths, hq, hkv, d, DTYPE, density, bs,
                                                        device)
            args = (q, k, v, cu, qbo, kv_num, kv_idx, bs, d ** -0.5)
            ref = block_sparse_attention_ref(*args).float()
            outs = [("triton", block_sparse_attention(*args, config=config, use_tma=use_tma))]
            if config is None and bs == 128 and density == 0.3:
                outs.append(("flex", flex_block_sparse_attention(*args)))
            for name, out in outs:
                err = (out.float() - ref).abs().max().item()
                if not err < 3e-2:
                    raise AssertionError(f"{name} {config} {lengths} bs={bs} d={density}: "
                                         f"max err {err}")


def check_importance(device, **kw):
    for length, bs, gen_block in [(2000, 128, 12), (1000, 32, 31)]:
        q = torch.randn(length, 8, 128, device=device, dtype=DTYPE)
        k = torch.randn(length, 2, 128, device=device, dtype=DTYPE)
        ref = block_importance_ref(q, k, SCALE, bs, gen_block)
        for got in (block_importance(q, k, SCALE, bs, gen_block, **kw),
                    block_importance(q, k, SCALE, bs, gen_block, lse=_dense_lse(q, k), **kw)):
            for a, b in zip(got, ref):
                err = ((a - b).abs().max() / b.abs().max()).item()
                if not err < 1e-2:
                    raise AssertionError(f"importance {kw} L={length} bs={bs}: rel err {err}")


def _dense_lse(q, k):
    kh = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return torch.logsumexp(torch.einsum("qhd,khd->hqk", q.float(), kh.float()) * SCALE, -1)


def cudnn_with_lse(qh, kh, vh):
    """The dense cuDNN pass, also returning each query's log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, scale=SCALE)


def cudnn_lse(qh, kh, vh):
    """[H, N] natural-log lse over all keys of one row [1, H, N, D]."""
    return cudnn_with_lse(qh, kh, vh)[1].reshape(qh.shape[1], qh.shape[2]).float()


def sdpa_ms(qh, kh, vh, backend):
    with sdpa_kernel([backend]):
        return ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=SCALE))


def run_size(n, densities, config, imp_kw, rows, device):
    nb = n // BS
    q, k, v = (torch.randn(n, HEADS, DIM, device=device, dtype=DTYPE) for _ in range(3))
    qh, kh, vh = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    qbo = torch.tensor([0, nb], dtype=torch.int32, device=device)
    dense_flops = 4 * n * n * DIM * HEADS

    def add(method, density, t, flops):
        rows.append(dict(N=n, method=method, density=density, ms=t, tflops=flops / t / 1e9))
        log(f"  N={n:6d} {method:14s} d={density:.2f} {t:9.3f} ms {flops / t / 1e9:7.1f} TFLOP/s")

    add("sdpa_cudnn", 1.0, sdpa_ms(qh, kh, vh, SDPBackend.CUDNN_ATTENTION), dense_flops)
    add("sdpa_flash", 1.0, sdpa_ms(qh, kh, vh, SDPBackend.FLASH_ATTENTION), dense_flops)
    full_num, full_idx = pattern(HEADS, nb, 1.0, device)
    add("triton_dense", 1.0, ms(lambda: block_sparse_attention(
        q, k, v, cu, qbo, full_num, full_idx, BS, SCALE, *config)), dense_flops)
    flex = compiled_flex_attention()
    for d in densities:
        kv_num, kv_idx = pattern(HEADS, nb, d, device)
        flops = 4 * int(kv_num.sum()) * BS * BS * DIM
        mask = row_block_mask(kv_num, kv_idx, n, BS)
        add("flex", d, ms(lambda: flex(qh, kh, vh, block_mask=mask, scale=SCALE)), flops)
        add("triton", d, ms(lambda: block_sparse_attention(
            q, k, v, cu, qbo, kv_num, kv_idx, BS, SCALE, *config)), flops)

    # Selection step: importance (+ top-k as SparseD does it), with and without the dense lse.
    gen_block = nb - 8            # a 1,024-token generation region
    lse = cudnn_lse(qh, kh, vh)
    diff = [((a - b).abs().max() / b.max()).item() for a, b in zip(
        block_importance(q, k, SCALE, BS, gen_block, lse=lse, **imp_kw),
        block_importance(q, k, SCALE, BS, gen_block, **imp_kw))]
    log(f"  importance with cuDNN lse vs own lse: max diff / max {max(diff):.1e}")

    def select(with_lse):
        imp_all, imp_gen = block_importance(q, k, SCALE, BS, gen_block,
                                            lse=lse if with_lse else None, **imp_kw)
        torch.topk(imp_all, int(nb * 0.3) + 1, dim=-1, sorted=False)
        torch.topk(imp_gen, int((nb - gen_block) * 0.3) + 1, dim=-1, sorted=False)

    add("cudnn+lse", 1.0, ms(lambda: cudnn_with_lse(qh, kh, vh)), dense_flops)
    half = dense_flops / 2        # importance does one QK^T over all tiles
    add("select_lse", 1.0, ms(lambda: select(True)), half)
    add("select_nolse", 1.0, ms(lambda: select(False)), half)


def sweep(device, n=32768, density=0.3):
    """Check each variant on small shapes, time it at n; return the fastest correct ones."""
    nb = n // BS
    q, k, v = (torch.randn(n, HEADS, DIM, device=device, dtype=DTYPE) for _ in range(3))
    lse = cudnn_lse(*(x.transpose(0, 1)[None].contiguous() for x in (q, k, v)))
    best_imp = (float("inf"), {})
    for w, st in IMP_SWEEP:
        kw = dict(num_warps=w, num_stages=st)
        try:
            check_importance(device, **kw)
            t = ms(lambda: block_importance(q, k, SCALE, BS, nb - 8, lse=lse, **kw))
            log(f"  sweep importance N={n} {kw}: {t:.3f} ms")
            best_imp = min(best_imp, (t, kw), key=lambda x: x[0])
        except Exception as e:
            log(f"  sweep importance {kw} failed: {type(e).__name__}: {str(e)[:300]}")
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    qbo = torch.tensor([0, nb], dtype=torch.int32, device=device)
    kv_num, kv_idx = pattern(HEADS, nb, density, device)
    flops = 4 * int(kv_num.sum()) * BS * BS * DIM
    best = (float("inf"), (DEFAULT_CONFIG, None))
    for c, tma in SWEEP:
        try:
            check_attention(device, c, tma)
            t = ms(lambda: block_sparse_attention(q, k, v, cu, qbo, kv_num, kv_idx, BS, SCALE,
                                                  config=c, use_tma=tma))
            log(f"  sweep N={n} d={density} {c} tma={tma}: {t:.3f} ms "
                f"{flops / t / 1e9:.1f} TFLOP/s")
            best = min(best, (t, (c, tma)), key=lambda x: x[0])
        except Exception as e:
            log(f"  sweep {c} tma={tma} failed: {type(e).__name__}: {str(e)[:300]}")
    return best[1], best_imp[1]


def write_outputs(rows, out, card, setup):
    lines = [f"Card: {card}; torch {torch.__version__}; one layer, {HEADS} heads x {DIM}, bf16, "
             f"block_size {BS}, non-causal; TFLOP/s on computed tiles; {setup}.", "",
             "| N | method | density | ms | TFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['method']} | {r['density']:.2f} | {r['ms']:.3f} | "
              f"{r['tflops']:.1f} |" for r in rows]
    get = {(r["N"], r["method"], r["density"]): r for r in rows}
    lines += ["", "| N | density | triton vs flex | triton / triton_dense (target <= d/0.85) |",
              "|---|---|---|---|"]
    for (n, m, d), r in get.items():
        if m == "triton":
            lines.append(f"| {n} | {d:.2f} | {get[(n, 'flex', d)]['ms'] / r['ms']:.2f}x | "
                         f"{r['ms'] / get[(n, 'triton_dense', 1.0)]['ms']:.3f} ({d / 0.85:.3f}) |")
    lines += ["", "| N | select (lse given) / cuDNN | select (no lse) / cuDNN |", "|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        if (n, "select_lse", 1.0) in get:
            base = get[(n, "sdpa_cudnn", 1.0)]["ms"]
            lines.append(f"| {n} | {get[(n, 'select_lse', 1.0)]['ms'] / base:.3f} | "
                         f"{get[(n, 'select_nolse', 1.0)]['ms'] / base:.3f} |")
    (out / "attention_results.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = {(r["method"], r["density"]) for r in rows if not r["method"].startswith("select")}
    for m, d in sorted(curves):
        pts = sorted((r["N"], r["tflops"]) for r in rows if (r["method"], r["density"]) == (m, d))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=m if d == 1.0 else f"{m} d={d}", linestyle="--" if m == "flex" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("TFLOP/s on computed tiles")
    ax.set_title(f"{card}: {HEADS}x{DIM} bf16, block {BS}")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / "attention.png", dpi=120, bbox_inches="tight")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,32768,65536")
    ap.add_argument("--densities", default="0.1,0.3,0.5")
    ap.add_argument("--sweep", action="store_true",
                    help="time the kernel variants at 32k first and use the fastest")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    log(f"{card}, torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    check_attention(device)
    check_importance(device)
    log(f"correctness OK ({time.time() - t0:.0f} s)")
    config, imp_kw = sweep(device) if args.sweep else ((DEFAULT_CONFIG, None), {})
    log(f"attention config {config}, importance {imp_kw} ({time.time() - t0:.0f} s)")
    rows = []
    for n in map(int, args.sizes.split(",")):
        run_size(n, [float(d) for d in args.densities.split(",")], config, imp_kw, rows, device)
        write_outputs(rows, out, card, f"kernel config {config}, importance {imp_kw}")
        log(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
