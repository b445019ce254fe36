"""The CLI: a flag for every EngineConfig and SamplingParams field, prompt files in two formats,
and every error one `error:` line with exit status 2 (checked through a real subprocess)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsed_engine.config import EngineConfig
from sparsed_engine.entrypoints.arg_utils import (add_engine_args, add_sampling_args, engine_flag,
                                                  engine_kwargs_from_args, sampling_flag, sampling_kwargs_from_args)
from sparsed_engine.entrypoints.cli import build_parser, main as cli_main
from sparsed_engine.sampling_params import SamplingParams
from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]


def _generate_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices["generate"]._actions for s in a.option_strings}


def test_every_field_has_a_flag():
    flags = _generate_flags()
    engine = {engine_flag(n) for n in EngineConfig.model_fields}
    sampling = {sampling_flag(n) for n in SamplingParams.model_fields}
    assert engine <= flags and sampling <= flags
    for named in ("--eps", "--max-num-seqs", "--max-num-batched-tokens", "--skip-tokenizer-init",
                  "--stop-token-ids", "--tokenizer", "--request-attention-config"):
        assert named in flags
    assert len(engine) + len(sampling) == len(EngineConfig.model_fields) + len(SamplingParams.model_fields)


def test_flags_parse_into_the_models():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_sampling_args(p)
    args = p.parse_args(["--max-tokens", "16", "--steps", "8", "--stop", "a", "--stop", "b",
                         "--stop-token-ids", "3", "--eps", "0.01", "--no-trust-remote-code",
                         "--skip-tokenizer-init", "--max-num-seqs", "4", "--dtype", "bf16",
                         "--attention-config", '{"skip": 0.5}', "--request-attention-config", '{"select": 0.5}',
                         "--distributed-executor-backend", "mp", "--sequence-parallel-size", "2"])
    sp = SamplingParams(**sampling_kwargs_from_args(args))
    assert (sp.max_tokens, sp.steps, sp.stop, sp.stop_token_ids, sp.eps) == (16, 8, ["a", "b"], [3], 0.01)
    assert sp.attention_config == {"select": 0.5}
    cfg = EngineConfig(model="m", **engine_kwargs_from_args(args))
    assert (cfg.trust_remote_code, cfg.skip_tokenizer_init, cfg.max_num_seqs, cfg.dtype) == (False, True, 4, "bf16")
    assert cfg.attention_config == {"skip": 0.5} and cfg.distributed_executor_backend == "mp"
    # flags left out are not passed on: the defaults live only in the models
    assert engine_kwargs_from_args(p.parse_args([])) == {} == sampling_kwargs_from_args(p.parse_args([]))


def test_help_comes_from_field_docs():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {s: a.help for a in sub.choices["generate"]._actions for s in a.option_strings}
    assert helps["--eps"].startswith("Dream: final timestep") and "(default: 0.001)" in helps["--eps"]
    dtype = next(a for a in sub.choices["generate"]._actions if "--dtype" in a.option_strings)
    assert "bfloat16" in dtype.choices and "int8" not in dtype.choices


def _run(*args, cwd=None):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "sparsed_engine.entrypoints.cli", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_readme_first_command_runs():
    """The README's first command (shortened to 16 tokens), on the bundled model."""
    readme = (ROOT / "README.md").read_text()
    assert 'sparsed-engine generate --prompt "The history of" --block-length 4 --temperature 0.8' in readme
    r = _run("generate", "--prompt", "The history of", "--block-length", "4", "--temperature", "0.8",
             "--top-k", "40", "--seed", "0", "--max-tokens", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=== request") == 1 and "16 generated" in r.stdout


def test_cli_errors_are_one_line_status_2(tiny_llada_dir, tmp_path, capsys):
    model = ["--model", str(tiny_llada_dir)]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"prompt_token_ids": [1, true]}\n')
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text('["a"]\n')
    cases = [
        (["generate", "--prompt", "x", "--temperature", "nan"], "SamplingParams.temperature=nan"),
        (["generate", "--prompt", "x", "--max-tokens", "1.5"], "argument --max-tokens: invalid int value"),
        (["generate", "--prompt", "x", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["generate", "--prompt", "x", "--attention-config", "{bad"], "argument --attention-config: not valid JSON"),
        (["generate", "--prompt", "x", "--attention-config", "[1]"], "must be a JSON object"),
        (["generate", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--prompt-file", str(tmp_path / "missing.txt")], "No such file or directory"),
        (["generate", "--prompt-file", str(bad_jsonl), "--prompt-format", "jsonl"],
         r"bad.jsonl:2['prompt_token_ids'][1]=True"),
        (["generate", "--prompt-file", str(not_obj), "--prompt-format", "jsonl"], "list.jsonl:1: each line must be"),
        (["generate", "--prompt-format", "yaml", "--prompt", "x"], "invalid choice: 'yaml'"),
        (["generate", *model], "no prompt given"),
        (["generate", *model, "--prompt", "x", "--steps", "0"], "SamplingParams.steps=0"),
        (["generate", *model, "--prompt", "x", "--unmasking", "greedy", "--max-tokens", "8"], "unmasking='greedy'"),
        (["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], "does not exist"),
        (["generate", "--model", "", "--prompt", "x"], "EngineConfig.model=''"),
        (["generate", *model, "--prompt", "x", "--attention-backend", "nope"], "unknown attention backend 'nope'"),
        (["generate", *model, "--prompt", "x", "--mask-pool-fraction", "inf"], "mask_pool_fraction=inf"),
        (["generate", *model, "--prompt", "x", "--kv-cache", "full"], "argument --kv-cache: invalid choice"),
        (["generate", *model, "--prompt", "x", "--request-kv-cache", "dual"], "SamplingParams.kv_cache='dual' needs"),
        (["generate", *model, "--prompt", "x", "--seed", str(2**64)], "SamplingParams.seed="),
        ([], "the following arguments are required: command"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, captured.err)
    # a real process too (each start imports torch, so a few representative kinds only)
    for argv, needle in [cases[0], cases[1], cases[6], cases[11], cases[-1]]:
        r = _run(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, r.stderr)


def test_prompt_file_text_is_taken_literally(tiny_llada_dir, tmp_path, capsys):
    """A line that happens to be JSON is still one text prompt (not a Python repr of it)."""
    f = tmp_path / "p.txt"
    f.write_text('["Hello", "world"]\n\n{"prompt": "x"}\n')
    rc = cli_main(["generate", "--model", str(tiny_llada_dir), "--prompt-file", str(f),
                   "--max-tokens", "8", "--steps", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("=== request") == 2


def test_prompt_file_jsonl(tiny_llada_dir, tmp_path, capsys):
    from sparsed_engine import LLM
    ids = LLM(model=str(tiny_llada_dir)).get_tokenizer().encode("Hello world")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hello world"}) + "\n\n" + json.dumps({"prompt_token_ids": ids}) + "\n")
    rc = cli_main(["generate", "--model", str(tiny_llada_dir), "--prompt-file", str(f), "--prompt-format", "jsonl",
                   "--max-tokens", "8", "--steps", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(f"({len(ids)} prompt tokens") == 2
    texts = out.split("=== request")[1:]
    assert texts[0].split("\n")[1] == texts[1].split("\n")[1]  # same prompt, greedy: same text


@pytest.mark.parametrize("argv", [["generate", "--chat", "--prompt", "Hi", "--stop-token-ids", "0"],
                                  ["generate", "--prompt", "Hi", "--stop", "the", "--cfg-scale", "0.5"]])
def test_generated_flags_reach_the_engine(tiny_llada_dir, capsys, argv):
    rc = cli_main([*argv, "--model", str(tiny_llada_dir), "--max-tokens", "8", "--steps", "2", "--no-progress",
                   "--max-num-seqs", "2", "--eps", "0.01"])
    assert rc == 0 and "=== request" in capsys.readouterr().out


def test_kv_cache_flags(tiny_llada_dir, capsys):
    """--kv-cache is the engine's default mode; SamplingParams.kv_cache, whose name clashes with it,
    is --request-kv-cache (the generated prefix of a clash). Both reach the engine."""
    from sparsed_engine import LLM
    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_sampling_args(p)
    args = p.parse_args(["--kv-cache", "dual", "--request-kv-cache", "none", "--kv-cache-bytes", "1048576",
                         "--kv-cache-page-size", "32", "--kv-cache-memory-fraction", "0.25"])
    cfg = EngineConfig(model="m", **engine_kwargs_from_args(args))
    assert (cfg.kv_cache, cfg.kv_cache_bytes, cfg.kv_cache_page_size, cfg.kv_cache_memory_fraction) == \
        ("dual", 1 << 20, 32, 0.25)
    assert SamplingParams(**sampling_kwargs_from_args(args)).kv_cache == "none"
    assert engine_kwargs_from_args(p.parse_args(["--request-kv-cache", "prefix"])) == {}
    assert sampling_kwargs_from_args(p.parse_args(["--kv-cache", "prefix"])) == {}
    prompt, sp = "The scheduler decides which sequences run in the next step.", \
        SamplingParams(max_tokens=32, steps=16, block_length=8)
    flags = ["--max-tokens", "32", "--steps", "16", "--block-length", "8", "--no-progress"]
    with LLM(model=str(tiny_llada_dir), kv_cache="dual", kv_cache_bytes=1 << 20) as llm:
        dual, exact = (llm.generate(prompt, sp.replace(kv_cache=m), use_tqdm=False)[0].outputs[0].text
                       for m in ("dual", "none"))
    assert dual != exact
    for extra, expect in ((["--kv-cache", "dual"], dual), (["--kv-cache", "dual", "--request-kv-cache", "none"], exact)):
        assert cli_main(["generate", "--model", str(tiny_llada_dir), "--prompt", prompt, "--kv-cache-bytes",
                         "1048576", *flags, *extra]) == 0
        assert "\n" + expect + "\n" in capsys.readouterr().out
