"""Property tests (issue 10): over SamplingParams fields, LLM options and prompts, drawn from valid
and hostile values alike, every input either fails before any work with an error naming the field
(nothing queued, no pool block held) or generates a valid output (no mask id, lengths consistent)
on the tiny checkpoints. One LLM per family serves every example."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from sparsed_engine import LLM, SamplingParams
from sparsed_engine.config import EngineConfig

# derandomized (the same examples every run), no shrinking (a failure prints its example as found)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                phases=[Phase.explicit, Phase.generate])
SAMPLING_EXAMPLES, PROMPT_EXAMPLES, ENGINE_EXAMPLES = 50, 60, 40

# values of the wrong type or outside every range, offered to every field
HOSTILE = st.sampled_from([None, True, False, math.nan, math.inf, -math.inf, -1, 0, 2**64, 1.5, -0.5,
                           "", "x", "8", b"8", [], [""], [1], {}, {"skip": 2.0}, (1,), 1e308])

SMALL_INT = st.integers(1, 12)
UNIT = st.floats(0, 1, allow_nan=False)
SAMPLING_VALID = {
    "max_tokens": SMALL_INT, "steps": st.none() | SMALL_INT, "block_length": st.none() | SMALL_INT,
    "temperature": st.floats(0, 3, allow_nan=False), "top_p": st.floats(0.05, 1), "top_k": st.none() | SMALL_INT,
    "unmasking": st.none() | st.sampled_from(["low_confidence", "random", "origin", "maskgit_plus",
                                              "topk_margin", "entropy", "greedy"]),
    "alg_temp": st.none() | UNIT, "eps": st.floats(0, 0.5), "cfg_scale": st.floats(0, 2),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "stop": st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=2),
    "attention_config": st.none() | st.fixed_dictionaries({}, optional={
        "skip": UNIT, "select": st.floats(0.05, 1), "block_size": st.sampled_from([16, 32]),
        "kernel": st.sampled_from(["auto", "torch"])}),
}


def _kwargs(valid: dict, hostile_share: float = 0.25):
    """A random subset of the fields, each valid or (sometimes) hostile."""
    def field(strategy):
        return st.one_of(strategy, strategy, HOSTILE) if hostile_share else strategy
    return st.fixed_dictionaries({}, optional={name: field(s) for name, s in valid.items()})


@pytest.fixture(scope="module")
def llms(tiny_llada_dir, tiny_dream_dir):
    return {"llada": LLM(model=str(tiny_llada_dir), attention_backend="sparsed", max_model_len=256),
            "dream": LLM(model=str(tiny_dream_dir), max_model_len=256)}


def _names_a_field(message: str, fields) -> bool:
    return any(f"{f}=" in message or f"{f} (" in message or f"{f}[" in message for f in fields)


def _check_nothing_left(llm):
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.get_stats()["mask_pool"]["used_blocks"] == 0


def _check_output(llm, out, params: SamplingParams, prompt_ids=None):
    mask = llm.llm_engine.info.mask_token_id
    c = out.outputs[0]
    assert out.finished and c.finish_reason in ("length", "stop")
    assert mask not in c.token_ids
    assert all(isinstance(t, int) and 0 <= t < llm.llm_engine.info.vocab_size for t in c.token_ids)
    assert len(c.token_ids) <= params.max_tokens
    if c.finish_reason == "length":
        assert len(c.token_ids) == params.max_tokens
    assert out.metrics.steps <= params.steps
    if prompt_ids is not None:
        assert out.prompt_token_ids == list(prompt_ids)


@settings(max_examples=SAMPLING_EXAMPLES, **SETTINGS)
@given(kwargs=_kwargs(SAMPLING_VALID), family=st.sampled_from(["llada", "dream"]))
def test_sampling_params_fail_early_or_generate(llms, kwargs, family):
    llm = llms[family]
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:  # InvalidTypeError is a ValueError too
        assert str(e).startswith("SamplingParams.") and _names_a_field(str(e), kwargs), e
        return
    try:
        outs = llm.generate(["The cat", [5, 6, 7]], params, use_tqdm=False)
    except ValueError as e:
        assert _names_a_field(str(e), list(kwargs) + ["attention_config"]), e
        _check_nothing_left(llm)
        return
    for out in outs:
        _check_output(llm, out, params)
    _check_nothing_left(llm)


TOKEN = st.integers(-3, 400)   # the tiny vocabularies are a few hundred; the mask id lies inside
HOSTILE_TOKEN = st.sampled_from([True, False, 1.0, "5", b"5", None, np.float32(2), 2**70])
PROMPT = st.one_of(
    st.text(max_size=12),
    st.lists(TOKEN, max_size=6),
    st.lists(st.one_of(TOKEN, HOSTILE_TOKEN), min_size=1, max_size=4),
    st.lists(TOKEN, max_size=6).map(lambda ids: np.array(ids, dtype=np.int64)),
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.text(max_size=8), HOSTILE_TOKEN),
                                        "prompt_token_ids": st.lists(TOKEN, max_size=5),
                                        "extra": st.just(1)}),
    HOSTILE_TOKEN,
)


@settings(max_examples=PROMPT_EXAMPLES, **SETTINGS)
@given(prompts=st.lists(PROMPT, min_size=1, max_size=3))
def test_prompts_fail_early_or_generate(llms, prompts):
    llm = llms["llada"]
    params = SamplingParams(max_tokens=4, steps=2)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    except ValueError as e:
        assert "prompt" in str(e), e
        _check_nothing_left(llm)
        return
    assert len(outs) == len(prompts)
    for out in outs:
        _check_output(llm, out, params)
    _check_nothing_left(llm)


ENGINE_VALID = {
    "dtype": st.sampled_from(["auto", "float32", "fp32", "bfloat16"]),
    "device": st.sampled_from(["auto", "cpu"]),
    "max_model_len": st.none() | st.integers(8, 1024),
    "attention_backend": st.none() | st.sampled_from(["dense", "sparsed"]),
    "attention_config": st.none() | st.fixed_dictionaries({}, optional={"skip": UNIT, "select": UNIT}),
    "mask_pool_bytes": st.none() | st.integers(0, 1 << 22),
    "mask_pool_fraction": st.floats(0.001, 0.05),
    "mask_pool_block_bytes": st.integers(64, 1 << 16),
    "max_num_seqs": st.integers(1, 4),
    "max_num_batched_tokens": st.none() | st.integers(1, 4096),
    "load_format": st.sampled_from(["auto", "safetensors", "dummy"]),
    "trust_remote_code": st.just(False),
    "skip_tokenizer_init": st.booleans(),
    "sequence_parallel_size": st.just(1),
    "distributed_executor_backend": st.none() | st.just("uni"),
}


@settings(max_examples=ENGINE_EXAMPLES, **SETTINGS)
@given(kwargs=_kwargs(ENGINE_VALID))
def test_llm_options_fail_early_or_generate(tiny_llada_dir, kwargs):
    try:
        EngineConfig(model=str(tiny_llada_dir), **kwargs)
    except ValueError as e:
        assert str(e).startswith("EngineConfig.") and _names_a_field(str(e), kwargs), e
        return
    try:
        llm = LLM(model=str(tiny_llada_dir), **kwargs)
    except ValueError as e:  # a setting only the backend or the model can judge
        assert _names_a_field(str(e), list(kwargs)) or "attention_config" in str(e) or "attention backend" in str(e), e
        return
    with llm:
        params = SamplingParams(max_tokens=4, steps=4)
        try:
            out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
        except ValueError as e:   # e.g. a pool too small for the pattern, a limit below the canvas
            assert "mask_pool_bytes" in str(e) or "max_model_len" in str(e), e
            _check_nothing_left(llm)
            return
        _check_output(llm, out, params, [5, 6, 7])
        assert (out.outputs[0].text == "") == kwargs.get("skip_tokenizer_init", False) or not out.outputs[0].token_ids
