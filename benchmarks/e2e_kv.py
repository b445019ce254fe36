"""Throughput mode at long context (`python -m benchmarks.e2e --kv`): step costs of the dual KV cache
against exact mode, LLaDA-8B shape, random bf16 weights, one request.

A 1,024-step generation of `gen` tokens (default 1,024: one token a step) in blocks of 32: the dual
cache runs one refresh step per block (the whole canvas) and cached steps in between (the block's
32 positions against the cached keys). Measured per length, through LLMEngine.step (synchronised),
aborting each request once the steps needed were seen:
  exact:        dense steps; a SparseD run selecting at step 1 (dense, select, sparse steps)
  dual, dense:  two blocks' steps (refresh, cached)
  dual, SparseD selecting at its first refresh (step `block`): a dense block, the selection
                refresh, a sparse block, a sparse refresh
The 1,024-step totals are computed from them with SparseD's schedule (K = int(steps*skip)+1; in
cache mode the selection happens at the first refresh at or after K). --full-run lengths run the
two cache modes end to end (all 1,024 steps).
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch

from benchmarks.length_plot import plot_by_length
from benchmarks.llada8b import prompt_ids
from benchmarks.steps import median_where, timed_kv_steps
from sparsed_engine import LLM, SamplingParams

DENSE = {"skip": 1.0}


def params(gen: int, block: int, steps: int, kv: str, cfg: dict) -> SamplingParams:
    return SamplingParams(max_tokens=gen, steps=steps, block_length=block, kv_cache=kv, attention_config=cfg)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def schedule_counts(steps: int, spb: int, skip: float) -> dict:
    """Steps of each (kind, phase) in a dual-cache SparseD generation: refresh at every block start;
    selection at the first refresh at or after K = int(steps*skip)+1; sparse after it."""
    k, selected = int(steps * skip) + 1, False
    counts = {"refresh_dense": 0, "cached_dense": 0, "select": 0, "refresh_sparse": 0, "cached_sparse": 0}
    for s in range(steps):
        refresh = s % spb == 0
        if refresh and not selected and s >= k:
            counts["select"] += 1
            selected = True
        elif refresh:
            counts["refresh_sparse" if selected else "refresh_dense"] += 1
        else:
            counts["cached_sparse" if selected else "cached_dense"] += 1
    return counts


def measure(llm: LLM, n: int, gen: int, block: int, steps: int, sparse: dict) -> dict:
    t0 = time.perf_counter()
    ids = prompt_ids(llm.get_tokenizer(), n - gen)
    reset_peak()
    exact_dense = timed_kv_steps(llm, ids, params(gen, block, steps, "none", DENSE), sync, 3)
    exact_sparse = timed_kv_steps(llm, ids, params(gen, block, steps, "none", {**sparse, "skip": 0.0}), sync, 5)
    spb = steps // (gen // block)
    dual_dense = timed_kv_steps(llm, ids, params(gen, block, steps, "dual", DENSE), sync, spb + 4)
    dual_sparse = timed_kv_steps(llm, ids, params(gen, block, steps, "dual", {**sparse, "skip": 0.0}), sync, 2 * spb + 4)
    r = {"N": n, "dense": median_where(exact_dense, "dense"),
         "select": median_where(exact_sparse, "select", skip_first=False),
         "sparse": median_where(exact_sparse, "sparse"),
         "refresh_dense": median_where(dual_dense + dual_sparse[:1], "dense", "refresh", skip_first=False),
         "cached_dense": median_where(dual_dense, "dense", "cached"),
         "refresh_select": median_where(dual_sparse, "select", "refresh", skip_first=False),
         "refresh_sparse": median_where(dual_sparse, "sparse", "refresh", skip_first=False),
         "cached_sparse": median_where(dual_sparse, "sparse", "cached"),
         "peak_gib": peak_gib(), "wall_s": time.perf_counter() - t0}
    return totals(r, gen // block, steps, sparse["skip"])


def totals(r: dict, blocks: int, steps: int, skip: float) -> dict:
    """The whole generation's time in each of the four modes from the measured step times in r."""
    k = int(steps * skip) + 1
    c = schedule_counts(steps, steps // blocks, skip)
    r["exact_dense_total"] = steps * r["dense"]
    r["exact_sparse_total"] = k * r["dense"] + r["select"] + (steps - k - 1) * r["sparse"]
    r["dual_dense_total"] = blocks * r["refresh_dense"] + (steps - blocks) * r["cached_dense"]
    r["dual_sparse_total"] = (c["refresh_dense"] * r["refresh_dense"] + c["cached_dense"] * r["cached_dense"]
                             + c["select"] * r["refresh_select"] + c["refresh_sparse"] * r["refresh_sparse"]
                             + c["cached_sparse"] * r["cached_sparse"])
    r["counts"] = c
    print(r, flush=True)
    return r


def full_run(llm: LLM, n: int, gen: int, block: int, steps: int, sparse: dict) -> dict:
    ids = prompt_ids(llm.get_tokenizer(), n - gen)
    res = {"N": n}
    for name, cfg in (("dual_dense", DENSE), ("dual_sparse", sparse)):
        reset_peak()
        sync()
        t = time.perf_counter()
        out = llm.generate([ids], params(gen, block, steps, "dual", cfg), use_tqdm=False)[0]
        sync()
        res[name] = time.perf_counter() - t
        res[f"{name}_steps"] = out.metrics.steps
        res[f"{name}_peak_gib"] = peak_gib()
        print(n, name, f"{res[name]:.1f} s", flush=True)
    return res


def warm_up(llm: LLM, n: int, gen: int, block: int, steps: int, sparse: dict) -> None:
    """Compile every kernel of the step kinds at a canvas of n before anything is timed."""
    ids = prompt_ids(llm.get_tokenizer(), n - gen)
    timed_kv_steps(llm, ids, params(gen, block, steps, "dual", {**sparse, "skip": 0.0}), sync,
                   2 * (steps // (gen // block)) + 2)
    timed_kv_steps(llm, ids, params(gen, block, steps, "none", {**sparse, "skip": 0.0}), sync, 3)


def write(rows: list[dict], fulls: list[dict], gen: int, block: int, steps: int, sparse: dict, pool_gib: float,
          out: Path) -> str:
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else float("nan")
    sp = f"skip {sparse['skip']}, select {sparse['select']}, block {sparse['block_size']}"
    lines = [f"### e2e throughput mode, LLaDA-8B shape, random bf16 weights, {gpu}, {datetime.date.today()}, "
             f"torch {torch.__version__}", "",
             f"One request: canvas N = prompt + {gen} generated tokens, {steps} steps, block {block} (one refresh "
             f"+ {steps // (gen // block) - 1} cached steps a block); SparseD {sp}. Step times in seconds (cached steps in ms); "
             f"{steps}-step totals computed from them. KV pool {pool_gib:.1f} GiB (sized for the longest canvas, "
             f"inside every peak).", "",
             "| N | exact dense step | exact sparse step | exact selection step | dual refresh dense | dual cached "
             "dense (ms) | dual selection refresh | dual refresh sparse | dual cached sparse (ms) | peak GiB "
             f"| exact dense {steps} steps (s) | exact SparseD | dual dense | dual + SparseD "
             "| dual + SparseD vs exact dense | vs exact SparseD | vs dual dense |", "|" + "---|" * 17]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['dense']:.3f} | {r['sparse']:.3f} | {r['select']:.3f} | {r['refresh_dense']:.3f} | "
            f"{r['cached_dense'] * 1e3:.1f} | {r['refresh_select']:.3f} | {r['refresh_sparse']:.3f} | "
            f"{r['cached_sparse'] * 1e3:.1f} | {r['peak_gib']:.1f} | {r['exact_dense_total']:.0f} | "
            f"{r['exact_sparse_total']:.0f} | {r['dual_dense_total']:.1f} | {r['dual_sparse_total']:.1f} | "
            f"{r['exact_dense_total'] / r['dual_sparse_total']:.1f}x | "
            f"{r['exact_sparse_total'] / r['dual_sparse_total']:.1f}x | "
            f"{r['dual_dense_total'] / r['dual_sparse_total']:.2f}x |")
    if rows:
        c = rows[0]["counts"]
        lines += ["", f"Dual + SparseD schedule over {steps} steps: {c['refresh_dense']} dense refreshes, "
                  f"{c['cached_dense']} dense cached steps, {c['select']} selection refresh, {c['refresh_sparse']} "
                  f"sparse refreshes, {c['cached_sparse']} sparse cached steps. Wall time of the measurements: "
                  + ", ".join(f"{r['N']}: {r['wall_s']:.0f} s" for r in rows) + "."]
    if fulls:
        lines += ["", f"Measured end to end ({steps} steps, {gen} tokens, block {block}):", "",
                  "| N | dual dense (s) | computed | peak GiB | dual + SparseD (s) | computed | peak GiB | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        by_n = {r["N"]: r for r in rows}
        for f in fulls:
            r = by_n.get(f["N"], {})
            lines.append(f"| {f['N']} | {f['dual_dense']:.1f} | {r.get('dual_dense_total', float('nan')):.1f} | "
                         f"{f['dual_dense_peak_gib']:.1f} | {f['dual_sparse']:.1f} | "
                         f"{r.get('dual_sparse_total', float('nan')):.1f} | {f['dual_sparse_peak_gib']:.1f} | "
                         f"{f['dual_dense'] / f['dual_sparse']:.2f}x |")
    longest = max(rows, key=lambda r: r["N"], default=None)
    if longest is not None:
        x, y = (longest["exact_dense_total"] / longest["dual_sparse_total"],
                longest["dual_dense_total"] / longest["dual_sparse_total"])
        fits = (f"; peak {longest['peak_gib']:.1f} GiB of the GPU's {total_gib:.0f} GiB "
                f"({'fits' if longest['peak_gib'] < total_gib else 'DOES NOT FIT'})" if cuda else "")
        lines += ["", f"At N={longest['N']}: dual + SparseD {x:.1f}x over exact dense ({'met' if x >= 20 else 'below'} "
                  f"the issue's >= 20x at 64k), {y:.2f}x over dual dense ({'met' if y >= 1.3 else 'below'} its "
                  f">= 1.3x){fits}."]
    table = "\n".join(lines) + "\n"
    (out / "e2e_kv.md").write_text(table)
    plot_by_length(rows, [("exact_dense_total", "exact, dense"), ("exact_sparse_total", "exact, SparseD"),
                          ("dual_dense_total", "dual cache, dense"), ("dual_sparse_total", "dual cache + SparseD")],
                   out / "e2e_kv.png", f"seconds for {steps} steps (computed)",
                   f"throughput mode at long context, LLaDA-8B shape, {gpu}", log=True, title_size=9)
    return table

