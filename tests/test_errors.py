"""Bad input fails before any work, with a message naming the value, and loses nothing."""
import json

import pytest

from sparsed_engine import LLM, SamplingParams
from sparsed_engine.entrypoints.cli import main as cli_main


@pytest.mark.parametrize("kwargs,needle", [
    (dict(steps=0), "steps=0"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(max_tokens=10, block_length=4), "block_length=4"),
    (dict(max_tokens=16, block_length=4, steps=6), "steps=6"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=0), "top_k=0"),
    (dict(cfg_scale=-1.0), "cfg_scale=-1.0"),
])
def test_sampling_params_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**kwargs)


def test_unknown_policy_refused_when_added(llada):
    """Policy names belong to each model family, so SamplingParams takes any name and the
    request is refused, before any work, by the family of the model it is sent to."""
    with pytest.raises(ValueError, match="unmasking='greedy'"):
        llada.generate("hi", SamplingParams(max_tokens=8, unmasking="greedy"), use_tqdm=False)
    assert not llada.llm_engine.has_unfinished_requests()


def test_policy_of_other_family(llada, tiny_dream_dir):
    with pytest.raises(ValueError, match="'origin' is not a llada policy"):
        llada.generate("hi", SamplingParams(max_tokens=8, unmasking="origin"), use_tqdm=False)
    dream = LLM(model=str(tiny_dream_dir))
    with pytest.raises(ValueError, match="'low_confidence' is not a dream policy"):
        dream.generate("hi", SamplingParams(max_tokens=8, unmasking="low_confidence"), use_tqdm=False)


def test_too_long_names_limit_and_knob(llada):
    limit = llada.llm_engine.max_model_len
    with pytest.raises(ValueError, match=rf"exceeds the model's limit of {limit}.*max_model_len"):
        llada.generate("hi", SamplingParams(max_tokens=limit), use_tqdm=False)


def test_max_model_len_raises_limit(tiny_llada_dir):
    llm = LLM(model=str(tiny_llada_dir), max_model_len=2048)
    limit = llm.llm_engine.info.max_model_len
    out = llm.generate("hi", SamplingParams(max_tokens=limit, steps=2, block_length=limit), use_tqdm=False)
    assert out[0].metrics.steps == 2


def test_bad_request_in_batch_loses_nothing(llada):
    good = SamplingParams(max_tokens=8, steps=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llada.generate(["ok", [10**9]], good, use_tqdm=False)
    assert not llada.llm_engine.has_unfinished_requests()
    assert llada.generate(["ok"], good, use_tqdm=False)[0].finished


@pytest.mark.parametrize("prompt,needle", [("", "prompt is empty"), ([], "prompt is empty"),
                                           (3.5, "must be a string")])
def test_bad_prompts(llada, prompt, needle):
    with pytest.raises(ValueError, match=needle):
        llada.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)


def test_mask_token_in_prompt(llada):
    mask = llada.llm_engine.info.mask_token_id
    with pytest.raises(ValueError, match=f"mask token id {mask}"):
        llada.generate([[5, mask]], SamplingParams(max_tokens=8), use_tqdm=False)


def test_params_count_mismatch(llada):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llada.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_missing_and_corrupt_model(tmp_path, tiny_llada_dir):
    with pytest.raises(FileNotFoundError, match="nope"):
        LLM(model=str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(model=str(bad))
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((tiny_llada_dir / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(model=str(odd))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dtype="int8"), "dtype='int8'"), (dict(device="tpu"), "device='tpu'"),
    (dict(max_model_len=0), "max_model_len=0"), (dict(load_format="pickle"), "load_format='pickle'"),
    (dict(attention_backend="nope"), "unknown attention backend 'nope'.*dense.*sparsed"),
])
def test_engine_config_errors(tiny_llada_dir, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LLM(model=str(tiny_llada_dir), **kwargs)


def test_cli_generates_and_reports_errors(tiny_llada_dir, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("Hello world\nThe cat\n")
    rc = cli_main(["generate", "--model", str(tiny_llada_dir), "--prompt-file", str(f),
                   "--max-tokens", "8", "--steps", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("=== request") == 2 and "generation" in out
    rc = cli_main(["generate", "--model", str(tiny_llada_dir), "--prompt", "x", "--steps", "0"])
    assert rc == 2 and "steps=0" in capsys.readouterr().err
