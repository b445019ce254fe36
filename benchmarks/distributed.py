"""Sequence-parallel step times of an LLaDA-8B-shaped model (random bf16 weights), 1 vs N GPUs.

Each (executor, GPU count, canvas length) runs in a fresh process: one GPU uses the in-process
executor, N > 1 the Ray or mp executor (--executors) with Ulysses sequence parallelism. Through
LLMEngine.step it times a dense step and a SparseD sparse step (and the selection step); on N > 1
it also times the step's collectives alone, at the step's shapes, on every rank (per layer the
all-to-alls of q, k, v and of the attention output, then the gather of the hidden rows behind the
logits) and reports the slowest rank's total as a share of each step. It also reports the bytes a
sparse step moves between processes: the pickled StepInput the driver sends (to each rank) and
the pickled result rank 0 returns (committed positions and token ids; sampling runs on rank 0).
Prints a table; writes distributed.md (rows for benchmarks/RESULTS.md) and distributed.png (when
matplotlib is installed) to --out.

    python -m benchmarks.distributed --gpus 1 2 --lengths 65536 --executors mp ray --out $OUT
    python -m benchmarks.distributed --tiny --out /tmp/sp    # CPU, tiny shape, gloo: checks it runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.llada8b import LLADA_8B_CONFIG
from benchmarks.steps import median_of, timed_steps
from sparsed_engine import LLM, SamplingParams

SPARSE = {"skip": 0.2, "select": 0.3, "block_size": 128}
GEN = 128   # generated tokens: the logits of one 128-token block per step
TINY_CONFIG = {**LLADA_8B_CONFIG, "d_model": 128, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
               "mlp_hidden_size": 256, "vocab_size": 1024, "embedding_size": 1024, "mask_token_id": 1000,
               "eos_token_id": 1001, "pad_token_id": 1001, "torch_dtype": "float32"}


# ---------------------------------------------------------------- one configuration (child process)
def time_collectives(worker, length: int, num_logits: int, iters: int) -> float:
    """Seconds one step's collectives take on this rank, run alone at the step's shapes.
    Ray pickles this function by value and runs it on every rank through collective_rpc."""
    import torch.distributed as dist

    g, lay = worker.group, worker.backend.layout   # the rank's heads; KV heads as sent (replicated)
    dev, dtype, d = worker.device, worker.backend.dtype, lay.head_dim
    shard = g.shard(length)
    q = torch.randn(shard.per_rank, lay.num_heads * g.size, d, device=dev, dtype=dtype)
    kv = torch.randn(shard.per_rank, lay.num_kv_heads * g.size, d, device=dev, dtype=dtype)
    out = torch.randn(length, lay.num_heads, d, device=dev, dtype=dtype)
    hidden = torch.randn(shard.per_rank, lay.num_heads * g.size * d, device=dev, dtype=dtype)
    rows = torch.arange(length - num_logits, length)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_step():
        for _ in range(lay.num_layers):
            for x in (q, kv, kv):
                g.to_heads(x, length)
            g.to_tokens(out)
        g.gather_rows(hidden, rows, shard)

    one_step()  # warm-up: NCCL sets up its channels
    sync()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(iters):
        one_step()
    sync()
    return (time.perf_counter() - t) / iters


def record_steps(engine) -> list:
    """Keep every (StepInput, result) the engine's executor handles, to size them after timing."""
    calls, execute = [], engine.executor.execute

    def recorded(step):
        out = execute(step)
        calls.append((step, out))
        return out

    engine.executor.execute = recorded
    return calls


def pickled_bytes(calls: list) -> tuple[int, int]:
    """Median pickled size of the step inputs and of the results among steps with rows."""
    sizes = [(len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)),
              len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))) for s, r in calls if s.rows]
    return (int(statistics.median(a for a, _ in sizes)), int(statistics.median(b for _, b in sizes)))


def measure(gpus: int, length: int, tiny: bool, executor: str) -> dict:
    cuda = not tiny
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sparse = {**SPARSE, "block_size": 32} if tiny else SPARSE
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(TINY_CONFIG if tiny else LLADA_8B_CONFIG))
        llm = LLM(model=tmp, load_format="dummy", skip_tokenizer_init=True, device="cuda" if cuda else "cpu",
                  dtype="bfloat16" if cuda else "float32", attention_backend="sparsed", attention_config=sparse,
                  mask_pool_bytes=1 << (22 if tiny else 28), max_model_len=length, sequence_parallel_size=gpus,
                  distributed_executor_backend=executor)
    with llm:
        mask = llm.llm_engine.info.mask_token_id
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, mask, (length - GEN,), generator=g).tolist()
        warm = min(length, 4096) - GEN  # compile the kernels on a short canvas first
        timed_steps(llm, ids[:warm], SamplingParams(max_tokens=GEN, steps=3, attention_config={"skip": 0.0}), sync)
        dense = timed_steps(llm, ids, SamplingParams(max_tokens=GEN, steps=3, attention_config={"skip": 1.0}), sync)
        # skip 0 selects at step 1: one dense step, the selection step, then sparse steps
        calls = record_steps(llm.llm_engine)
        steps = timed_steps(llm, ids, SamplingParams(max_tokens=GEN, steps=6, attention_config={"skip": 0.0}),
                            sync)
        bytes_in, bytes_out = pickled_bytes(calls)
        r = {"executor": executor, "gpus": gpus, "N": length, "dense": median_of(dense, "dense"),
             "select": median_of(steps, "select", skip_first=False), "sparse": median_of(steps, "sparse"),
             "comm": 0.0, "bytes_in": bytes_in, "bytes_out": bytes_out}
        if gpus > 1:
            r["comm"] = max(llm.llm_engine.executor.collective_rpc(time_collectives, length, GEN, 3))
        r["device"] = torch.cuda.get_device_name() if cuda else "CPU"
    return r


# ---------------------------------------------------------------- driver
def run_child(gpus: int, length: int, tiny: bool, executor: str) -> dict:
    spec = json.dumps({"gpus": gpus, "length": length, "tiny": tiny, "executor": executor})
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--child", spec], cwd=root,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"{executor}, {gpus} GPU(s), N={length} failed (exit {proc.returncode}); see stderr above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], tiny: bool) -> str:
    base = {r["N"]: r for r in rows if r["gpus"] == 1}
    shape = "tiny LLaDA shape, random fp32 weights, gloo" if tiny else "LLaDA-8B shape, random bf16 weights, NCCL"
    lines = [f"### Sequence parallel (Ulysses), {shape}, {rows[0]['device']}, "
             f"{datetime.date.today()}, torch {torch.__version__}, SparseD skip 0 / select "
             f"{SPARSE['select']}, {GEN} positions sampled per step on rank 0", "",
             "| executor | GPUs | N | dense step (s) | sparse step (s) | selection step (s) | dense speedup | "
             "sparse speedup | collectives (s) | comm share dense | comm share sparse | step input (bytes, "
             "to each rank) | result (bytes, from rank 0) |", "|" + "---|" * 13]
    for r in rows:
        b = base.get(r["N"])
        speed = (f"{b['dense'] / r['dense']:.2f}x | {b['sparse'] / r['sparse']:.2f}x" if b else "- | -")
        moved = f"{r['bytes_in']:,} | {r['bytes_out']:,}" if r["gpus"] > 1 else "- | -"  # in-process: none
        lines.append(f"| {r['executor']} | {r['gpus']} | {r['N']} | {r['dense']:.3f} | {r['sparse']:.3f} | "
                     f"{r['select']:.3f} | {speed} | {r['comm']:.3f} | {r['comm'] / r['dense']:.1%} | "
                     f"{r['comm'] / r['sparse']:.1%} | {moved} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    gpus = sorted({r["gpus"] for r in rows})
    executors = sorted({r["executor"] for r in rows if r["gpus"] > 1})
    curves = [(n, ex) for n in sorted({r["N"] for r in rows}) for ex in executors]
    for i, (n, ex) in enumerate(curves):
        rs = {r["gpus"]: r for r in rows if r["N"] == n and (r["executor"] == ex or r["gpus"] == 1)}
        xs = [g for g in gpus if g in rs]
        size = f"{n // 1024}k" if n % 1024 == 0 else str(n)
        for key, style in (("dense", "-o"), ("sparse", "--s")):
            kw = dict(color=f"C{i}", label=f"{key} step, N={size}, {ex}")
            ax_t.plot(xs, [rs[g][key] for g in xs], style, **kw)
            if 1 in rs:
                ax_s.plot(xs, [rs[1][key] / rs[g][key] for g in xs], style, **kw)
    ax_s.plot(gpus, gpus, ":", color="grey", label="linear")
    for ax, ylabel in ((ax_t, "seconds per step"), (ax_s, "speedup over 1 GPU")):
        ax.set_xlabel("GPUs (sequence parallel)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(gpus)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ulysses sequence parallelism, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=None, help="default: 1 2 4 (--tiny: 1 2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 32768 65536 (--tiny: 384 999)")
    ap.add_argument("--executors", nargs="+", choices=("ray", "mp"), default=["ray", "mp"],
                    help="executors to run N > 1 GPUs with (one GPU runs in-process)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU ranks over gloo")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["gpus"], spec["length"], spec["tiny"], spec["executor"])))
        return
    gpus = args.gpus or ([1, 2] if args.tiny else [1, 2, 4])
    lengths = args.lengths or ([384, 999] if args.tiny else [32768, 65536])
    rows = []
    for n in lengths:
        for g in gpus:
            for ex in (["uni"] if g == 1 else args.executors):
                rows.append(run_child(g, n, args.tiny, ex))
                r = rows[-1]
                print(f"{ex}, {g} GPU(s), N={n}: dense {r['dense']:.3f}s sparse {r['sparse']:.3f}s "
                      f"select {r['select']:.3f}s collectives {r['comm']:.3f}s, step input "
                      f"{r['bytes_in']:,} B, result {r['bytes_out']:,} B", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows, args.tiny)
    print(md)
    (out / "distributed.md").write_text(md)
    (out / "distributed.json").write_text(json.dumps(rows, indent=1))
    if not plot(rows, out / "distributed.png"):
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
