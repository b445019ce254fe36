"""Generation through LLM(...).generate against literal re-statements of the official loops."""
import pytest
import torch

from sparsed_engine import SamplingParams
from tests import reference_generate as ref


def _model(llm):
    worker = llm.llm_engine.executor.worker
    return worker.model, worker.backend


def _ids(llm, text):
    return llm.get_tokenizer().encode(text)


@pytest.mark.parametrize("max_tokens,steps,block", [(16, 16, 16), (16, 8, 4), (12, 6, 4), (8, 12, 8)])
def test_llada_greedy_matches_official_loop(llada, max_tokens, steps, block):
    prompt = _ids(llada, "The quick brown fox")
    out = llada.generate([prompt], SamplingParams(max_tokens=max_tokens, steps=steps, block_length=block),
                         use_tqdm=False)[0]
    model, backend = _model(llada)
    expect = ref.llada_generate(model, backend, prompt, steps, max_tokens, block,
                                llada.llm_engine.info.mask_token_id)
    got = out.outputs[0].token_ids
    assert got and got == expect[:len(got)]


def test_llada_cfg_matches_official_loop(llada):
    prompt = _ids(llada, "Write a short poem")
    params = SamplingParams(max_tokens=8, steps=4, block_length=4, cfg_scale=1.5)
    out = llada.generate([prompt], params, use_tqdm=False)[0]
    model, backend = _model(llada)
    expect = ref.llada_generate(model, backend, prompt, 4, 8, 4, llada.llm_engine.info.mask_token_id, 1.5)
    assert out.outputs[0].token_ids == expect[:len(out.outputs[0].token_ids)]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [16, 5])
def test_dream_greedy_matches_official_loop(dream, alg, steps):
    prompt = _ids(dream, "Hello world! This is")
    out = dream.generate([prompt], SamplingParams(max_tokens=16, steps=steps, unmasking=alg),
                         use_tqdm=False)[0]
    model, backend = _model(dream)
    expect = ref.dream_generate(model, backend, prompt, steps, 16, dream.llm_engine.info.mask_token_id, alg)
    got = out.outputs[0].token_ids
    assert got and got == expect[:len(got)]


@pytest.mark.parametrize("which,policy", [("llada", "random"), ("llada", "low_confidence"),
                                          ("dream", "origin"), ("dream", "entropy")])
def test_sampling_is_seeded(request, which, policy):
    llm = request.getfixturevalue(which)
    p = dict(max_tokens=16, steps=8, temperature=0.9, top_p=0.9, unmasking=policy)
    a = llm.generate(["Hello"], SamplingParams(seed=1, **p), use_tqdm=False)[0].outputs[0]
    b = llm.generate(["Hello"], SamplingParams(seed=1, **p), use_tqdm=False)[0].outputs[0]
    c = [llm.generate(["Hello"], SamplingParams(seed=s, **p), use_tqdm=False)[0].outputs[0].token_ids
         for s in (2, 3, 4)]
    assert a.token_ids == b.token_ids
    assert any(t != a.token_ids for t in c)


def test_batched_equals_alone(llada, dream):
    for llm in (llada, dream):
        prompts = ["Hello world", "The scheduler decides which sequences run in the next step.", "Two"]
        params = [SamplingParams(max_tokens=16, steps=8, block_length=8),
                  SamplingParams(max_tokens=8, steps=8, temperature=0.7, seed=5),
                  SamplingParams(max_tokens=12, steps=6, block_length=12, cfg_scale=0.5)]
        batched = llm.generate(prompts, params, use_tqdm=False)
        alone = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
        assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
        assert [o.prompt for o in batched] == prompts


def test_greedy_is_deterministic(dream):
    p = SamplingParams(max_tokens=16, steps=8, unmasking="maskgit_plus")
    assert (dream.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids
            == dream.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids)


def test_prompt_forms_agree(llada):
    tok = llada.get_tokenizer()
    ids = tok.encode("Hello world")
    p = SamplingParams(max_tokens=8, steps=4)
    outs = llada.generate(["Hello world", {"prompt_token_ids": ids}, ids], p, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].prompt_token_ids == ids


def test_chat_uses_template(llada):
    msgs = [{"role": "user", "content": "hi there"}]
    out = llada.chat(msgs, SamplingParams(max_tokens=8, steps=4), use_tqdm=False)[0]
    tok = llada.get_tokenizer()
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out.prompt == text
    assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)


def test_stop_token_and_stop_string(llada):
    base = llada.generate("Hello", SamplingParams(max_tokens=16, steps=8), use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llada.generate("Hello", SamplingParams(max_tokens=16, steps=8, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    text = base.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    out = llada.generate("Hello", SamplingParams(max_tokens=16, steps=8, stop=[needle]),
                         use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.find(needle)]
    assert (out.finish_reason, out.stop_reason) == ("stop", needle)


def test_eos_cuts_text(llada):
    """The first EOS ends the output; tokens after it are dropped."""
    eng = llada.llm_engine
    seq = eng.make_sequence("Hello", SamplingParams(max_tokens=6, steps=6))
    eos = min(eng.eos_token_ids)
    seq.canvas[seq.prompt_len:] = torch.tensor([40, 41, eos, 42, eos, 43])
    c = eng._output(seq).outputs[0]
    assert c.token_ids == [40, 41] and c.finish_reason == "stop" and c.stop_reason is None


def test_metrics_and_finish_reason(dream):
    out = dream.generate("Hello", SamplingParams(max_tokens=8, steps=4), use_tqdm=False)[0]
    assert out.finished and out.metrics.steps == 4
    assert out.metrics.seconds is not None and out.metrics.seconds >= 0
    assert out.outputs[0].finish_reason in ("stop", "length")
    assert out.metrics.num_generated_tokens == len(out.outputs[0].token_ids)
