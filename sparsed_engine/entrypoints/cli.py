"""`sparsed-engine generate [--model DIR] --prompt "..."`: generate from the command line;
`sparsed-engine serve [--model DIR]`: an OpenAI-compatible server (entrypoints/openai).

The engine and sampling flags are generated from EngineConfig and SamplingParams (arg_utils.py).
Every error, from a bad flag to an engine refusal, is one `error: ...` line on stderr and exit
status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NoReturn

from sparsed_engine.entrypoints.arg_utils import (add_engine_args, add_sampling_args, engine_kwargs_from_args,
                                                  sampling_kwargs_from_args)
from sparsed_engine.entrypoints.openai.cli_args import add_serve_args, run_server
from sparsed_engine.inputs import parse_prompt

PROMPT_FORMATS = ("text", "jsonl")


class CliError(Exception):
    """A command-line problem reported as one error line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsed-engine", description="A vLLM-style engine for diffusion LMs with SparseD attention")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    io = g.add_argument_group("prompts and output")
    io.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    io.add_argument("--prompt-file", help="a file of prompts: one per line (see --prompt-format)")
    io.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="text",
                    help="text: each non-empty line is a prompt; jsonl: each non-empty line is a JSON object "
                         "with 'prompt' (text) or 'prompt_token_ids' (default: text)")
    io.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(g)
    add_sampling_args(g)
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_args(s)
    add_serve_args(s)
    return p


def _read_prompt_file(path: str, fmt: str) -> list:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if fmt == "text":
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(obj, dict):
            raise CliError(f"{path}:{n}: each line must be a JSON object with 'prompt' or 'prompt_token_ids'")
        try:
            parse_prompt(obj, f"{path}:{n}")
        except ValueError as e:
            raise CliError(str(e)) from None
        prompts.append(obj)
    return prompts


def _read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += _read_prompt_file(args.prompt_file, args.prompt_format)
    if not prompts:
        raise CliError("no prompt given: use --prompt or --prompt-file")
    if args.chat and not all(isinstance(p, str) for p in prompts):
        raise CliError("--chat takes text prompts, not token ids")
    return prompts


def generate(args) -> None:
    from sparsed_engine.llm import LLM
    from sparsed_engine.sampling_params import SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(**sampling_kwargs_from_args(args))
    t0 = time.perf_counter()
    with LLM(**engine_kwargs_from_args(args)) as llm:
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


def _error_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (CliError, ValueError, TypeError, OSError)):
        return f"error: {text}"
    return f"error: {type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            generate(args)
        elif args.command == "serve":
            run_server(args, engine_kwargs_from_args(args))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the command line never shows a traceback: one line, status 2
        print(_error_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
