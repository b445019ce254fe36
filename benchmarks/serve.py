"""Serving benchmark (like vLLM's benchmark_serving): a client firing streamed completions at an
OpenAI-compatible server at a Poisson rate (or all at once: --request-rate inf, saturation).

For each --backends entry it starts `sparsed-engine serve` in a subprocess (or targets --url), fires
--num-requests requests of --prompt-len tokens, and reports requests/s, output tokens/s, time to first
token (first streamed text) and end-to-end latency, p50/p99; then, unless --no-offline, runs the same
requests through offline `LLM.generate` in this process and reports the server's throughput as a share
of it. Prints a table; writes serve.json (per-request records and the summary), serve.md and serve.png
(when matplotlib is installed) to --out.

It also reads the server's /metrics around the measured run: the engine steps it ran and the seconds
spent inside them ("engine s"), so a shortfall against offline shows whether it came from more steps,
slower steps, or time between steps. With both backends it prints the p50-latency ratio dense/SparseD
beside the engine-time ratio of the same run (what offline generation would gain) and --e2e-ratio.

    # LLaDA-8B shape, random bf16 weights, one GPU (see benchmarks/RESULTS.md); the server needs the
    # [serve] extra (benchmarks/serve_wheels.sh builds its wheels for an offline machine):
    python -m benchmarks.serve --llada8b --prompt-len 512 --num-requests 16 --out $OUT/short
    # long prompts, dense vs SparseD p50 latency against the engine's own step-time ratio (~4 min on an H200)
    python -m benchmarks.serve --llada8b --prompt-len 32768 --num-requests 2 --max-tokens 32 --steps 16 \
        --no-offline --e2e-step-times 1.709 4.045 1.142 --out $OUT/long
    # CPU, bundled tiny model: checks it runs
    python -m benchmarks.serve --prompt-len 64 --max-tokens 32 --steps 8 --num-requests 8 --out /tmp/serve
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.llada8b import prompt_ids, write_model_dir

SPARSE = {"skip": 0.2, "select": 0.3, "block_size": 128}
BACKEND_CONFIG = {"dense": None, "sparsed": SPARSE}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the server
class Server:
    """`sparsed-engine serve` in a subprocess on a free port; stopped with SIGTERM."""

    def __init__(self, args, model: str, backend: str):
        cmd = [sys.executable, "-m", "sparsed_engine.entrypoints.cli", "serve", "--model", model,
               "--port", "0", "--served-model-name", "bench", "--uvicorn-log-level", "warning",
               "--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device,
               "--max-model-len", str(args.prompt_len + args.max_tokens), "--attention-backend", backend]
        if BACKEND_CONFIG[backend] is not None:
            cmd += ["--attention-config", json.dumps(BACKEND_CONFIG[backend])]
        if args.kv_cache not in (None, "none"):
            cmd += ["--kv-cache", args.kv_cache]   # the engine allocates its KV pool only when asked
        if args.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("SPARSED_API_KEY", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + args.server_timeout
        self.url = None
        while self.url is None:
            found = [m for line in self.lines if (m := re.search(r"on (http://[\d.]+:\d+)/v1", line))]
            if found:
                self.url = found[0].group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))
            else:
                time.sleep(0.2)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------- the client
async def one_request(http: httpx.AsyncClient, body: dict, delay: float) -> dict:
    await asyncio.sleep(delay)   # the request's scheduled arrival (Poisson process)
    t0 = time.perf_counter()
    ttft, usage, text = None, None, []
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"ok": False, "error": f"{resp.status_code} {(await resp.aread()).decode()[:300]}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]["message"]}
            for choice in chunk.get("choices", []):
                if choice["text"]:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(choice["text"])
            usage = chunk.get("usage") or usage
    e2e = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "start": t0,
            "output_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "text": "".join(text)}


async def run_client(url: str, prompts: list[list[int]], args) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if args.request_rate != float("inf"):
            t += rng.expovariate(args.request_rate)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as http:
        # every prompt at once: the kernels are compiled for the measured batch's shapes, not one row's
        warm = await asyncio.gather(*(one_request(http, {**request_body(p, i, args), "steps": warmup_steps(args)}, 0.0)
                                      for i, p in enumerate(prompts)))
        failed = [w["error"] for w in warm if not w["ok"]]
        if failed:
            raise RuntimeError(f"a warm-up request failed: {failed[0]}")
        before = await engine_counters(http)
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one_request(http, request_body(p, i, args), d)
                                         for i, (p, d) in enumerate(zip(prompts, delays))))
        seconds = time.perf_counter() - t0
        after = await engine_counters(http)
        return records, seconds, {k: after[k] - before[k] for k in after}


async def engine_counters(http: httpx.AsyncClient) -> dict:
    """The server's engine steps and seconds inside them so far (from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    found = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return {"steps": found.get("sparsed:denoising_steps_total", 0.0),
            "engine_seconds": found.get("sparsed:engine_step_seconds_total", 0.0)}


def warmup_steps(args) -> int:
    """The fewest steps (a multiple of the blocks) whose schedule has a dense, a selection and a
    sparse step, and with a KV cache two steps a block (a refresh and a cached step, whose paged
    attention kernels are others): compiles every kernel of the measured batch's shapes without a
    whole run. A kernel left out would be compiled inside the server's measured steps, while the
    offline run after it finds it in Triton's disk cache."""
    blocks = args.max_tokens // args.block_length
    steps = blocks * (2 if args.kv_cache in ("prefix", "dual") else 1)
    while int(steps * SPARSE["skip"]) + 1 >= steps - 1:   # SparseD selects at int(steps * skip) + 1
        steps += blocks
    return steps


def extra_fields(args) -> dict:
    """The optional sampling fields the flags ask for (sent only when given)."""
    extra = {}
    if args.kv_cache is not None:
        extra["kv_cache"] = args.kv_cache
    if args.threshold is not None:
        extra.update(unmasking="confidence_threshold", threshold=args.threshold)
    return extra


def request_body(prompt: list[int], i: int, args) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "steps": args.steps,
            "block_length": args.block_length, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}, **extra_fields(args)}


# ---------------------------------------------------------------- offline reference
def run_offline(model: str, backend: str, prompts: list[list[int]], args) -> dict:
    import torch

    from sparsed_engine import LLM, SamplingParams

    llm = LLM(model=model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=args.prompt_len + args.max_tokens, attention_backend=backend,
              attention_config=BACKEND_CONFIG[backend], kv_cache=args.kv_cache or "none",
              max_num_batched_tokens=args.max_num_batched_tokens)
    extra = extra_fields(args)
    params = [SamplingParams(max_tokens=args.max_tokens, steps=args.steps, block_length=args.block_length, seed=i,
                             **extra) for i in range(len(prompts))]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, steps=warmup_steps(args),
                                         block_length=args.block_length, **extra), use_tqdm=False)
    sync()
    engine, steps = llm.llm_engine, 0
    step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted_step   # the steps offline generation needs, beside the server's
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - t0
    llm.shutdown()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # the next backend's server gets the memory back
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "steps": steps, "requests_per_s": len(prompts) / seconds,
            "output_tokens_per_s": tokens / seconds, "texts": [o.outputs[0].text for o in outs]}


# ---------------------------------------------------------------- summary
def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))] if v else float("nan")


def summarize(backend: str, records: list[dict], seconds: float, engine: dict, offline: dict | None) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["output_tokens"] for r in ok)
    row = {"backend": backend, "requests": len(records), "failed": len(records) - len(ok), "seconds": seconds,
           "requests_per_s": len(ok) / seconds, "output_tokens_per_s": tokens / seconds,
           "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
           "e2e_p50": pct([r["e2e"] for r in ok], 50), "e2e_p99": pct([r["e2e"] for r in ok], 99),
           "server_steps": int(engine["steps"]), "engine_seconds": engine["engine_seconds"]}
    if offline is not None:
        row["offline_steps"] = offline["steps"]
        row["offline_seconds"] = offline["seconds"]
        row["offline_output_tokens_per_s"] = offline["output_tokens_per_s"]
        row["server_vs_offline"] = row["output_tokens_per_s"] / offline["output_tokens_per_s"]
        row["same_text_as_offline"] = sum(r["ok"] and r["text"] == t for r, t in zip(records, offline["texts"]))
    return row


COLUMNS = [("backend", "backend", "{}"), ("requests", "requests", "{}"), ("failed", "failed", "{}"),
           ("requests_per_s", "req/s", "{:.3f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
           ("ttft_p50", "TTFT p50 (s)", "{:.2f}"), ("ttft_p99", "TTFT p99 (s)", "{:.2f}"),
           ("e2e_p50", "e2e p50 (s)", "{:.2f}"), ("e2e_p99", "e2e p99 (s)", "{:.2f}"),
           ("server_steps", "server steps", "{}"), ("engine_seconds", "engine s", "{:.2f}"),
           ("offline_steps", "offline steps", "{}"), ("offline_seconds", "offline s", "{:.2f}"),
           ("offline_output_tokens_per_s", "offline out tok/s", "{:.1f}"),
           ("server_vs_offline", "server/offline", "{:.1%}"), ("same_text_as_offline", "same text", "{}")]


def table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def schedule_ratio(steps: int, dense: float, select: float, sparse: float) -> float:
    """Dense time / SparseD time of one `steps`-step generation from per-step times: SparseD's
    steps before int(steps * skip) + 1 are dense, that one selects, the rest are sparse."""
    at = min(int(steps * SPARSE["skip"]) + 1, steps)
    sparsed = at * dense + (select if at < steps else 0.0) + max(steps - at - 1, 0) * sparse
    return steps * dense / sparsed


def latency_comparison(rows: list[dict], e2e_ratio: float | None, e2e_source: str = "--e2e-ratio") -> str | None:
    """Dense vs SparseD: the p50-latency ratio beside the engine-time ratio of the same run (what
    the e2e benchmark measures: generation without serving) and, when given, --e2e-ratio."""
    by = {r["backend"]: r for r in rows}
    if not {"dense", "sparsed"} <= by.keys():
        return None
    d, s = by["dense"], by["sparsed"]
    serve = d["e2e_p50"] / s["e2e_p50"]
    engine = d["engine_seconds"] / s["engine_seconds"] if s["engine_seconds"] > 0 else float("nan")
    lines = ["| measure | dense | SparseD | dense / SparseD |", "|---|---|---|---|",
             f"| e2e latency p50 (s), served | {d['e2e_p50']:.2f} | {s['e2e_p50']:.2f} | {serve:.3f}x |",
             f"| engine seconds in steps, same run | {d['engine_seconds']:.2f} | {s['engine_seconds']:.2f} | "
             f"{engine:.3f}x |"]
    if e2e_ratio is not None:
        lines.append(f"| e2e benchmark ({e2e_source}) | - | - | {e2e_ratio:.3f}x |")
    target, source = (e2e_ratio, e2e_source) if e2e_ratio is not None else (engine, "this run's engine time")
    verdict = "met" if serve >= target else "MISSED"
    lines += ["", f"Target, SparseD's p50 latency below dense's by at least the e2e ratio ({source}): "
                  f"{serve:.3f}x vs {target:.3f}x, {verdict}."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for backend, res in results.items():
        ok = [r for r in res["records"] if r["ok"]]
        for ax, key in zip(axes, ("ttft", "e2e")):
            v = sorted(r[key] for r in ok)
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], marker=".", label=backend)
    for ax, title in zip(axes, ("time to first token (s)", "end-to-end latency (s)")):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled tiny LLaDA)")
    ap.add_argument("--llada8b", action="store_true",
                    help="an LLaDA-8B-shaped folder with random weights (implies --load-format dummy)")
    ap.add_argument("--url", default=None, help="target this running server (its --served-model-name must be "
                                                "'bench') instead of starting one; implies --no-offline")
    ap.add_argument("--backends", nargs="+", default=["dense", "sparsed"], choices=list(BACKEND_CONFIG))
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s of the Poisson arrivals (default inf: all at once, saturation)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine's token budget, server and offline alike (default: the engine's); "
                         "num-requests x (prompt-len + max-tokens) runs every request in one batch")
    ap.add_argument("--kv-cache", choices=["none", "prefix", "dual"], default=None,
                    help="send the request field kv_cache (default: not sent, the server's default)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="send unmasking=confidence_threshold with this threshold (parallel decoding)")
    ap.add_argument("--e2e-ratio", type=float, default=None,
                    help="the e2e benchmark's dense/SparseD time ratio at this length (benchmarks/RESULTS.md), "
                         "printed beside the served p50-latency ratio")
    ap.add_argument("--e2e-step-times", type=float, nargs=3, metavar=("DENSE", "SELECT", "SPARSE"), default=None,
                    help="the e2e benchmark's step seconds at this length (benchmarks/RESULTS.md): the e2e ratio "
                         "is computed for this run's schedule (--steps, SparseD's skip) instead of --e2e-ratio")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds the server may take to start")
    ap.add_argument("--request-timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="benchmarks/out/serve")
    args = ap.parse_args()
    for name in ("num_requests", "prompt_len", "max_tokens", "steps", "block_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.max_tokens % args.block_length or args.steps % (args.max_tokens // args.block_length):
        ap.error("--max-tokens must be a multiple of --block-length, and --steps of the number of blocks")
    if not args.request_rate > 0:
        ap.error(f"--request-rate={args.request_rate}: must be > 0 (inf: all at once)")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        ap.error(f"--threshold={args.threshold}: must be in (0, 1]")
    if args.e2e_ratio is not None and not args.e2e_ratio > 0:
        ap.error(f"--e2e-ratio={args.e2e_ratio}: must be > 0")
    if args.e2e_step_times is not None:
        if args.e2e_ratio is not None:
            ap.error("give --e2e-ratio or --e2e-step-times, not both")
        if not all(t > 0 for t in args.e2e_step_times):
            ap.error(f"--e2e-step-times={args.e2e_step_times}: every time must be > 0")
        args.e2e_ratio = schedule_ratio(args.steps, *args.e2e_step_times)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tmp = tempfile.TemporaryDirectory()
    if args.llada8b:
        model = str(write_model_dir(Path(tmp.name) / "llada8b"))
        args.load_format = "dummy"
    else:
        from sparsed_engine.llm import DEFAULT_MODEL
        model = args.model or str(DEFAULT_MODEL)
    from model_executor.model_loader import load_tokenizer
    tokenizer = load_tokenizer(model, False)
    # distinct prompts of exactly --prompt-len tokens: windows of the long prompt at different offsets
    base = prompt_ids(tokenizer, args.prompt_len + 31 * args.num_requests)
    prompts = [base[31 * i:31 * i + args.prompt_len] for i in range(args.num_requests)]

    results, rows = {}, []
    for backend in args.backends:
        server = None if args.url else Server(args, model, backend)
        try:
            url = args.url or server.url
            records, seconds, engine = asyncio.run(run_client(url, prompts, args))
        finally:
            if server is not None:
                server.stop()
        offline = None if (args.no_offline or args.url) else run_offline(model, backend, prompts, args)
        rows.append(summarize(backend, records, seconds, engine, offline))
        results[backend] = {"summary": rows[-1], "records": [{k: v for k, v in r.items() if k != "text"}
                                                             for r in records]}
        print(table(rows[-1:]), flush=True)
        for r in records:
            if not r["ok"]:
                print(f"failed request: {r['error']}", flush=True)
    tmp.cleanup()

    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    head = (f"### serve, {'LLaDA-8B shape, random weights' if args.llada8b else Path(model).name}, {gpu}, "
            f"{time.strftime('%Y-%m-%d')}: {args.num_requests} requests at rate {args.request_rate}/s, "
            f"prompt {args.prompt_len}, {args.max_tokens} tokens, {args.steps} steps, block {args.block_length}"
            + "".join(f", {k} {v}" for k, v in extra_fields(args).items()))
    md = f"{head}\n\n{table(rows)}\n"
    source = ("--e2e-ratio" if args.e2e_step_times is None else
              "step times {} / {} / {} s over this schedule".format(*args.e2e_step_times))
    comparison = latency_comparison(rows, args.e2e_ratio, source)
    if comparison is not None:
        md += f"\n{comparison}\n"
    print("\n" + md)
    (out / "serve.md").write_text(md)
    (out / "serve.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "gpu": gpu,
                                                "results": results}, indent=1, default=str))
    if plot(results, out / "serve.png"):
        print(f"wrote {out / 'serve.png'}")
    print(f"wrote {out / 'serve.json'} and {out / 'serve.md'}")


if __name__ == "__main__":
    main()
