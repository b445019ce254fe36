"""`sparsed-engine generate [--model DIR] --prompt "..."`: generate from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

from sparsed_engine.entrypoints.openai.cli_args import add_engine_args, add_serve_args, engine_kwargs_from_args, run_server
from sparsed_engine.llm import LLM
from sparsed_engine.sampling_params import SamplingParams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsed-engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model folder (default: the bundled tiny LLaDA, sparsed_engine/default_model)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompt-file", help="a file with one prompt per line, or a JSON list of prompts")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--block-length", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--unmasking", default=None)
    g.add_argument("--alg-temp", type=float, default=None)
    g.add_argument("--cfg-scale", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--attention-backend", default=None)
    g.add_argument("--attention-config", type=json.loads, default=None, help='JSON, e.g. \'{"skip": 0.2}\'')
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--load-format", default="auto")
    g.add_argument("--mask-pool-bytes", type=int, default=None)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--sequence-parallel-size", type=int, default=1,
                   help="spread each sequence over this many GPUs (Ulysses sequence parallelism)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["uni", "ray", "mp"],
                   help="default: uni for one GPU, ray for more (mp: local processes, no Ray)")
    g.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_args(s)
    add_serve_args(s)
    return p


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
        try:
            loaded = json.loads(text)
            prompts += loaded if isinstance(loaded, list) else [str(loaded)]
        except json.JSONDecodeError:
            prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt or --prompt-file")
    return prompts


def generate(args) -> None:
    prompts = _read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, unmasking=args.unmasking,
        alg_temp=args.alg_temp, cfg_scale=args.cfg_scale, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              attention_backend=args.attention_backend, attention_config=args.attention_config,
              load_format=args.load_format, mask_pool_bytes=args.mask_pool_bytes,
              trust_remote_code=args.trust_remote_code, sequence_parallel_size=args.sequence_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend)
    with llm:
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                            use_tqdm=not args.no_progress)
        else:
            outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
        t_gen = time.perf_counter() - t0
        backend = llm.get_stats()["backend"]
    for out in outs:
        c = out.outputs[0]
        print(f"=== request {out.request_id} ({len(out.prompt_token_ids)} prompt tokens, "
              f"{len(c.token_ids)} generated, finish_reason={c.finish_reason}, "
              f"{out.metrics.steps} steps, {out.metrics.seconds:.2f}s)")
        print(c.text)
    print(f"--- model load {t_load:.2f}s, generation {t_gen:.2f}s for {len(outs)} request(s), "
          f"backend {backend}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "serve":
            run_server(args, engine_kwargs_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
