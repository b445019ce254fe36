"""A cached step's attention, one layer on a GPU: our Triton paged kernel against torch (K/V
gathered from the pages into contiguous tensors, then SDPA), and the fused K/V store against
torch's index store.

Shapes: LLaDA-8B (32 q heads, 32 kv heads, 128) and Dream-7B (28, 4, 128), bf16, pages of
--page-size tokens in a shuffled pool. Per model: one row of 32 fresh queries against 16k, 32k,
64k keys (dense); 32 rows of 32 queries against 640 keys each (the throughput workload); the
64k row sparse (density 0.3, block 128, random kept blocks per head). Every case is first
checked against the torch reference (ops/paged_attn_ref.py). GB/s counts the K/V bytes the
attention needs: every key once (dense), each head's kept blocks (sparse). A short sweep of the
kernel's (BLOCK_N, warps, stages) and of GQA head packing runs on the 64k and 640-key shapes.
Times are medians of triton.testing.do_bench. Writes paged_attn.md to --out (default $OUT).

  python benchmarks/paged_attn.py            # H200: about 1 minute
  python benchmarks/paged_attn.py --toy      # CPU (Triton interpreter), tiny shapes: runs only
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if "--toy" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the first kernel import

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_backends.ops.paged_attn import (DEFAULT_CONFIG, _plan,  # noqa: E402
                                               paged_attention, write_kv)
from attention_backends.ops.paged_attn_ref import paged_attention_ref, write_kv_ref  # noqa: E402

# (BLOCK_N, num_warps, num_stages); None: the kernel's default (DEFAULT_CONFIG, 8 warps when packed)
SWEEP = [None, (64, 4, 3), (32, 4, 3), (64, 4, 2), (64, 8, 3), (128, 8, 3), (128, 4, 2)]


def log(*a):
    print(*a, flush=True)


class Setup:
    """Sizes of the full run or of --toy."""

    def __init__(self, toy: bool, page_size: int | None):
        self.toy = toy
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if toy:
            self.models = {"llada": (4, 4, 16), "dream": (6, 2, 16)}
            self.lengths, self.fresh, self.rows, self.row_len, self.block = [64, 128, 256], 8, 4, 80, 16
            self.page_size, self.dtype, self.sweep = page_size or 16, torch.float32, SWEEP[:2]
        else:
            self.models = {"llada": (32, 32, 128), "dream": (28, 4, 128)}
            self.lengths, self.fresh, self.rows, self.row_len, self.block = \
                [16384, 32768, 65536], 32, 32, 640, 128
            self.page_size, self.dtype, self.sweep = page_size or 64, torch.bfloat16, SWEEP
        self.density = 0.3

    def ms(self, fn):
        if self.device.type == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=60, return_mode="median")
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


class Case:
    """Rows (q_start, fresh queries, kv_len) of one model's layer in a shuffled page pool,
    optionally with a random block pattern; the torch baseline's gather indices precomputed."""

    def __init__(self, st: Setup, heads, rows, density=None):
        hq, hkv, d = heads
        ps, dev = st.page_size, st.device
        self.rows, self.d, self.hq, self.hkv = rows, d, hq, hkv
        need = [-(-n // ps) for _, _, n in rows]
        perm = torch.randperm(sum(need), device=dev).int()
        self.page_table = torch.zeros(len(rows), max(need), dtype=torch.int32, device=dev)
        off = 0
        for r, n in enumerate(need):
            self.page_table[r, :n] = perm[off:off + n]
            off += n
        self.k_cache, self.v_cache = (torch.randn(sum(need), ps, hkv, d, device=dev, dtype=st.dtype)
                                      for _ in range(2))
        counts = [nq for _, nq, _ in rows]
        self.q = torch.randn(sum(counts), hq, d, device=dev, dtype=st.dtype)
        self.meta = (torch.tensor([0] + counts).cumsum(0).int(),
                     torch.tensor([s for s, _, _ in rows], dtype=torch.int32),
                     torch.tensor([n for _, _, n in rows], dtype=torch.int32))
        self.scale = d ** -0.5
        self.pattern, self.ref = (), None
        self.kv_bytes = sum(n for *_, n in rows) * hkv * d * 2 * self.q.element_size()
        if density is not None:
            self.pattern = self._pattern(st.block, density, dev)
            kept = int(self.pattern[2].sum())
            self.kv_bytes = kept * st.block * d * 2 * self.q.element_size()
        # torch baseline: every row has the same shape here, so one batched gather + SDPA
        n = rows[0][2]
        pos = torch.arange(n, device=dev)
        self.gather = (self.page_table.long()[:, pos // ps], (pos % ps).expand(len(rows), n))

    def _pattern(self, bs, density, dev):
        nqb = [(s + nq - 1) // bs - s // bs + 1 for s, nq, _ in self.rows]
        nb = max(-(-n // bs) for *_, n in self.rows)
        keep = min(nb, int(nb * density) + 1)
        kv_idx = torch.rand(self.hq, sum(nqb), nb, device=dev).argsort(-1)[..., :keep]
        kv_idx = F.pad(kv_idx.sort(-1).values, (0, nb - keep)).int().contiguous()
        kv_num = torch.full((self.hq, sum(nqb)), keep, dtype=torch.int32, device=dev)
        return bs, torch.tensor([0] + nqb).cumsum(0).int(), kv_num, kv_idx

    def kernel(self, **kw):
        return paged_attention(self.q, self.k_cache, self.v_cache, self.page_table, *self.meta,
                               self.scale, *self.pattern, **kw)

    def reference(self):
        return paged_attention_ref(self.q, self.k_cache, self.v_cache, self.page_table,
                                   *self.meta, self.scale, *self.pattern)

    def gathered(self):
        pages, slots = self.gather
        return [c[pages, slots].transpose(1, 2) for c in (self.k_cache, self.v_cache)]

    def sdpa(self, k, v):
        """Dense SDPA of each row's queries over contiguous K/V [R, Hkv, n, D]."""
        r, nq = len(self.rows), self.rows[0][1]
        qh = self.q.view(r, nq, self.hq, self.d).transpose(1, 2)
        return F.scaled_dot_product_attention(qh, k, v, scale=self.scale,
                                              enable_gqa=self.hq != self.hkv)

    def check(self, **kw):
        if self.ref is None:
            self.ref = self.reference().float()
        err = (self.kernel(**kw).float() - self.ref).abs().max().item()
        if not err < 3e-2:
            raise AssertionError(f"kernel {kw} vs reference: max err {err}")


def keys(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def attention_rows(st: Setup, model, heads, out):
    """The cases of one model: dense 1 x fresh queries at each length, the throughput rows, sparse."""
    n_long, fresh = st.lengths[-1], st.fresh
    cases = [(f"dense 1x{fresh} q, {keys(n)} keys", [(n - 4 * fresh, fresh, n)], None)
             for n in st.lengths]
    cases.append((f"dense {st.rows}x{fresh} q, {st.row_len} keys",
                  [(st.row_len - 2 * fresh, fresh, st.row_len)] * st.rows, None))
    cases.append((f"sparse d={st.density} bs={st.block}, 1x{fresh} q, {keys(n_long)} keys",
                  [(n_long - 4 * fresh, fresh, n_long)], st.density))
    for name, rows, density in cases:
        c = Case(st, heads, rows, density)
        c.check()
        t_kernel = st.ms(lambda: c.kernel())
        k, v = c.gathered()
        t_contig = st.ms(lambda: c.sdpa(k, v))
        del k, v
        t_torch = st.ms(lambda: c.sdpa(*c.gathered()))
        row = dict(model=model, case=name, triton=t_kernel, torch=t_torch, sdpa=t_contig,
                   gbs=c.kv_bytes / t_kernel / 1e6, speedup=t_torch / t_kernel)
        out.append(row)
        log(f"  {model:5s} {name:42s} triton {t_kernel:8.3f} ms {row['gbs']:7.0f} GB/s | "
            f"gather+sdpa {t_torch:8.3f} | sdpa(contig) {t_contig:8.3f} | x{row['speedup']:.2f}")
        del c


def sweep_rows(st: Setup, model, heads, out):
    """Kernel configs (and GQA packing) on the longest dense row and the throughput rows."""
    hq, hkv, _ = heads
    shapes = [("1 row, longest", [(st.lengths[-1] - 4 * st.fresh, st.fresh, st.lengths[-1])]),
              ("throughput rows", [(st.row_len - 2 * st.fresh, st.fresh, st.row_len)] * st.rows)]
    packs = [True, False] if 1 < hq // hkv <= 8 else [False]
    for shape, rows in shapes:
        c = Case(st, heads, rows)
        for cfg in st.sweep:
            for pack in packs:
                try:
                    c.check(config=cfg, pack_gqa=pack)
                    t = st.ms(lambda: c.kernel(config=cfg, pack_gqa=pack))
                    out.append(dict(model=model, shape=shape, config=cfg, pack=pack, ms=t,
                                    gbs=c.kv_bytes / t / 1e6))
                    log(f"  sweep {model:5s} {shape:16s} {cfg or 'default'} pack={pack!s:5s} {t:8.3f} ms "
                        f"{c.kv_bytes / t / 1e6:7.0f} GB/s")
                except Exception as e:   # a config may not compile (shared memory): say so, go on
                    log(f"  sweep {model} {shape} {cfg} pack={pack} failed: "
                        f"{type(e).__name__}: {str(e)[:200]}")
        del c


def plan_us(st: Setup, heads):
    """Host cost of building one step's plan for the throughput rows (once per step, not per layer)."""
    rows = st.rows
    cu = [i * st.fresh for i in range(rows + 1)]
    starts, lens = [st.row_len - 2 * st.fresh] * rows, [st.row_len] * rows
    t = time.perf_counter()
    for _ in range(20):
        _plan(cu, starts, lens, cu[-1], -(-st.row_len // st.page_size), st.page_size, None, 128,
              1, heads[0], DEFAULT_CONFIG[0], None, 528)
    return (time.perf_counter() - t) / 20 * 1e6


def write_rows(st: Setup, model, heads, out):
    _, hkv, d = heads
    t = st.rows * st.fresh
    pages = -(-st.rows * st.row_len // st.page_size)
    caches = [torch.randn(pages, st.page_size, hkv, d, device=st.device, dtype=st.dtype)
              for _ in range(2)]
    k, v = (torch.randn(t, hkv, d, device=st.device, dtype=st.dtype) for _ in range(2))
    slots = torch.randperm(pages * st.page_size, device=st.device)[:t]
    expect = [x.clone() for x in caches]
    write_kv_ref(*expect, k, v, slots)
    write_kv(*caches, k, v, slots)
    if not all(torch.equal(a, b) for a, b in zip(caches, expect)):
        raise AssertionError("write_kv differs from write_kv_ref")
    moved = 2 * 2 * k.numel() * k.element_size()          # read + write, K and V
    t_fused = st.ms(lambda: write_kv(*caches, k, v, slots))
    t_torch = st.ms(lambda: write_kv_ref(*caches, k, v, slots))
    out.append(dict(model=model, tokens=t, triton=t_fused, torch=t_torch,
                    gbs=moved / t_fused / 1e6))
    log(f"  write_kv {model:5s} {t} tokens: triton {t_fused * 1e3:7.1f} us, torch index store "
        f"{t_torch * 1e3:7.1f} us")


def report(st: Setup, attn, sweep, writes, plan):
    dev = torch.cuda.get_device_name() if st.device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"# Paged attention of a cached step, one layer ({dev}, {st.dtype}, page size "
             f"{st.page_size}{', TOY sizes' if st.toy else ''})", "",
             "torch = K/V gathered from the pages into contiguous tensors, then SDPA; "
             "sdpa(contig) = SDPA alone on K/V already contiguous (no paging). GB/s: K/V bytes "
             "the attention needs / triton time.", "",
             "| model | case | triton ms | GB/s | torch ms | sdpa(contig) ms | speedup vs torch |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['case']} | {r['triton']:.3f} | {r['gbs']:.0f} | "
              f"{r['torch']:.3f} | {r['sdpa']:.3f} | {r['speedup']:.2f}x |" for r in attn]
    lines += ["", f"Default config (BLOCK_N, warps, stages) = {DEFAULT_CONFIG}. Sweep:", "",
              "| model | shape | config | pack GQA | ms | GB/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['shape']} | {r['config'] or 'default'} | {r['pack']} | {r['ms']:.3f} | "
              f"{r['gbs']:.0f} |" for r in sweep]
    lines += ["", "| write_kv | tokens | triton us | torch us | GB/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens']} | {r['triton'] * 1e3:.1f} | {r['torch'] * 1e3:.1f} | "
              f"{r['gbs']:.0f} |" for r in writes]
    lines += ["", f"Host plan for the {st.rows} throughput rows: {plan:.0f} us (built once per step; "
              "the layers reuse it)."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--page-size", type=int, default=None, help="tokens per page (64; toy 16)")
    ap.add_argument("--toy", action="store_true", help="tiny shapes; runs on CPU")
    args = ap.parse_args()
    st = Setup(args.toy, args.page_size)
    if st.device.type != "cuda" and not st.toy:
        sys.exit("no GPU: run with --toy to try the script on CPU")
    torch.manual_seed(0)
    t0 = time.time()
    attn, sweep, writes = [], [], []
    for model, heads in st.models.items():
        attention_rows(st, model, heads, attn)
        write_rows(st, model, heads, writes)
    for model, heads in st.models.items():
        sweep_rows(st, model, heads, sweep)
    plan = plan_us(st, st.models["llada"])
    text = report(st, attn, sweep, writes, plan)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "paged_attn.md").write_text(text)
    log("\n" + text)
    log(f"wrote {Path(args.out) / 'paged_attn.md'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
