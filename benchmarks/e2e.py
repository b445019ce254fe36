"""End-to-end step times of an LLaDA-8B-shaped model (random bf16 weights) at long context.

Measures, on one GPU, through the engine itself (LLMEngine.step, synchronised):
a dense step with cuDNN attention and with FA2 attention, SparseD's selection step and a sparse
step, and peak memory, at each canvas length; a measured 128-step generation (dense vs SparseD)
at the --full-run lengths; and the 1,024-step totals at each length *computed* from the measured
step times. Prints a table and writes it (e2e.md, for benchmarks/RESULTS.md) and a PNG plot to --out.

    python benchmarks/e2e.py --lengths 16384 32768 65536 --full-run 16384 --out $OUT
    python benchmarks/e2e.py --lengths --full-run --profile 32768   # where a step's time goes
    python -m benchmarks.e2e --kv --out $OUT   # throughput mode (dual KV cache) vs exact: benchmarks/e2e_kv.py
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch

from attention_backends.sdpa import SDPA_ENV
from benchmarks import e2e_kv
from benchmarks.length_plot import plot_by_length
from benchmarks.llada8b import kv_pool_bytes, prompt_ids, write_model_dir
from benchmarks.steps import median_of, timed_steps
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.config import DEFAULT_MODEL

SPARSE = {"skip": 0.2, "select": 0.3, "block_size": 128}
GEN = 128


def sdpa_steps(llm: LLM, ids: list[int], params: SamplingParams, sdpa: str = "", sync=torch.cuda.synchronize):
    """timed_steps with the dense SDPA kernel pinned (cudnn, flash) or chosen automatically ("");
    `sync` waits for the device (a no-op on CPU)."""
    os.environ[SDPA_ENV] = sdpa
    try:
        return timed_steps(llm, ids, params, sync)
    finally:
        os.environ[SDPA_ENV] = ""


def measure_length(llm: LLM, n: int) -> dict:
    ids = prompt_ids(llm.get_tokenizer(), n - GEN)
    dense = dict(max_tokens=GEN, steps=4, attention_config={"skip": 1.0})
    torch.cuda.reset_peak_memory_stats()
    r = {"N": n,
         "dense_cudnn": median_of(sdpa_steps(llm, ids, SamplingParams(**dense), "cudnn"), "dense"),
         "dense_fa2": median_of(sdpa_steps(llm, ids, SamplingParams(**dense), "flash"), "dense")}
    # skip 0 selects at step 1: one dense step, the selection step, then sparse steps
    steps = sdpa_steps(llm, ids, SamplingParams(max_tokens=GEN, steps=8,
                                                 attention_config={**SPARSE, "skip": 0.0}))
    r["select"] = median_of(steps, "select", skip_first=False)
    r["sparse"] = median_of(steps, "sparse")
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    k = int(1024 * SPARSE["skip"]) + 1
    r["dense_1024"] = 1024 * r["dense_cudnn"]
    r["fa2_1024"] = 1024 * r["dense_fa2"]
    r["sparse_1024"] = k * r["dense_cudnn"] + r["select"] + (1024 - k - 1) * r["sparse"]
    print(r, flush=True)
    return r


def full_run(llm: LLM, n: int) -> dict:
    ids = prompt_ids(llm.get_tokenizer(), n - GEN)
    res = {"N": n}
    for name, cfg in (("dense", {"skip": 1.0}), ("sparsed", SPARSE)):
        p = SamplingParams(max_tokens=GEN, steps=128, block_length=32, attention_config=cfg)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([ids], p, use_tqdm=False)
        torch.cuda.synchronize()
        res[name] = time.perf_counter() - t
        print(n, name, f"{res[name]:.1f} s", flush=True)
    return res


def profile_steps(llm: LLM, n: int, out: Path) -> None:
    """Kernel-time tables (torch.profiler) of one dense, one selection and one sparse step."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.llm_engine
    seq = eng.make_sequence(prompt_ids(llm.get_tokenizer(), n - GEN),
                            SamplingParams(max_tokens=GEN, steps=8, attention_config={**SPARSE, "skip": 0.0}))
    eng.add_sequence(seq)
    seen, text = set(), []
    while eng.has_unfinished_requests():
        phase = eng.scheduler.phase_of(seq)
        if phase in seen or phase not in ("dense", "select", "sparse"):
            eng.step()
            continue
        seen.add(phase)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eng.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70)
        text.append(f"## {phase} step at N={n}\n{table}")
        print(text[-1], flush=True)
    (out / f"profile_{n}.txt").write_text("\n".join(text))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536])
    ap.add_argument("--full-run", type=int, nargs="*", default=[16384])
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="lengths to profile a step of")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--kv", action="store_true", help="measure throughput mode instead (benchmarks/e2e_kv.py): "
                    "exact vs dual KV cache, dense and SparseD, 1,024-step totals; --full-run runs the cache modes")
    ap.add_argument("--kv-gen", type=int, default=1024, help="--kv: tokens generated in the 1,024 steps")
    ap.add_argument("--kv-block", type=int, default=32, help="--kv: semi-AR block (one refresh per block)")
    ap.add_argument("--kv-steps", type=int, default=1024, help="--kv: steps of the generation")
    ap.add_argument("--toy", action="store_true", help="--kv on CPU: the bundled model with random weights, "
                    "a 128-token canvas, 32 tokens in 32 steps, block 8 (checks the script runs; its times mean nothing)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.kv:
        return run_kv(args, out)
    gpu = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(model=str(write_model_dir(Path(tmp))), load_format="dummy", dtype="bfloat16",
                  attention_backend="sparsed", attention_config=SPARSE,
                  max_model_len=max(args.lengths + args.full_run + args.profile) + GEN)
        sdpa_steps(llm, prompt_ids(llm.get_tokenizer(), 4096), SamplingParams(  # compile kernels
            max_tokens=GEN, steps=4, attention_config={**SPARSE, "skip": 0.0}))
        for n in args.profile:
            profile_steps(llm, n, out)
        rows = [measure_length(llm, n) for n in args.lengths]
        fulls = [full_run(llm, n) for n in args.full_run]
    if not rows and not fulls:
        return
    lines = [f"### e2e, LLaDA-8B shape, random bf16 weights, {gpu}, "
             f"{datetime.date.today()}, torch {torch.__version__}",
             "", "| N | dense step cuDNN (s) | dense step FA2 (s) | selection step (s) | sparse step (s) "
             "| peak GiB | 1,024 steps dense cuDNN (computed, s) | 1,024 steps FA2 | 1,024 steps SparseD "
             "| speedup vs cuDNN | vs FA2 |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['N']} | {r['dense_cudnn']:.3f} | {r['dense_fa2']:.3f} | {r['select']:.3f} | "
                     f"{r['sparse']:.3f} | {r['peak_gib']:.1f} | {r['dense_1024']:.0f} | {r['fa2_1024']:.0f} | "
                     f"{r['sparse_1024']:.0f} | {r['dense_1024'] / r['sparse_1024']:.2f}x | "
                     f"{r['fa2_1024'] / r['sparse_1024']:.2f}x |")
    if fulls:
        lines += ["", "Measured 128-step generations (128 tokens, block 32, skip 0.2, select 0.3):", "",
                  "| N | dense cuDNN engine (s) | SparseD engine (s) | speedup |", "|---|---|---|---|"]
        lines += [f"| {f['N']} | {f['dense']:.1f} | {f['sparsed']:.1f} | {f['dense'] / f['sparsed']:.2f}x |"
                  for f in fulls]
    table = "\n".join(lines) + "\n"
    print(table)
    (out / "e2e.md").write_text(table)  # rows for benchmarks/RESULTS.md
    plot_by_length(rows, [("dense_cudnn", "dense step, cuDNN"), ("dense_fa2", "dense step, FA2"),
                          ("sparse", "SparseD sparse step"), ("select", "SparseD selection step")],
                   out / "e2e.png", "seconds per step", f"LLaDA-8B shape, {gpu}")


def run_kv(args, out: Path) -> None:
    sparse, gen, block, steps, warm = SPARSE, args.kv_gen, args.kv_block, args.kv_steps, 4096
    if args.toy:
        args.lengths, args.full_run, warm = [128], [128], 128
        sparse, gen, block, steps = {**SPARSE, "block_size": 32}, 32, 8, 32
    longest = max(args.lengths + args.full_run + [warm])
    with tempfile.TemporaryDirectory() as tmp:
        model = str(DEFAULT_MODEL) if args.toy else str(write_model_dir(Path(tmp)))
        dtype = "float32" if args.toy else "bfloat16"
        pool = kv_pool_bytes(model, longest, 1, 4 if args.toy else 2)   # one request of the longest canvas
        llm = LLM(model=model, load_format="dummy", dtype=dtype, device="cpu" if args.toy else "auto",
                  attention_backend="sparsed", attention_config=sparse, max_model_len=longest, kv_cache_bytes=pool)
        e2e_kv.warm_up(llm, warm, gen, block, steps, sparse)
        rows = [e2e_kv.measure(llm, n, gen, block, steps, sparse) for n in args.lengths]
        fulls = [e2e_kv.full_run(llm, n, gen, block, steps, sparse) for n in args.full_run]
    print(e2e_kv.write(rows, fulls, gen, block, steps, sparse, pool / 2**30, out))


if __name__ == "__main__":
    main()
