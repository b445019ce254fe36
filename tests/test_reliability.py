"""A failing request fails alone; outputs agree with their text; duplicate ids are refused;
concurrent and interrupted generate calls leave the LLM correct."""
import random
import threading

import pytest

from model_executor.denoisers.llada import LLaDADenoiser
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.engine.llm_engine import LLMEngine

SPARSE = dict(attention_backend="sparsed", attention_config={"block_size": 16, "skip": 0.0},
              mask_pool_bytes=1 << 20)
PROMPTS = ["Hello world", "The scheduler decides which sequences run", "Two plus two"]
PARAMS = [SamplingParams(max_tokens=16, steps=8, block_length=8),
          SamplingParams(max_tokens=16, steps=8, temperature=0.8, seed=3),
          SamplingParams(max_tokens=16, steps=4, cfg_scale=0.5, seed=4)]


@pytest.fixture(scope="module")
def llm(tiny_llada_dir):
    return LLM(model=str(tiny_llada_dir), **SPARSE)


@pytest.fixture(scope="module")
def reference(llm):
    return _ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False))


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_clean(llm):
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests()
    stats = eng.scheduler.block_manager.stats()
    assert stats["used_blocks"] == 0 and stats["reserved_blocks"] == 0
    assert eng.executor.worker.sampler.generators == {}


# ---------------------------------------------------------------- failure isolation
def test_failing_request_fails_alone(llm, reference, monkeypatch):
    unmask = LLaDADenoiser.unmask

    def flaky(self, logits, s, gen):
        if s.seed == 13 and s.num_transfer == 2:   # mid-request, after its pattern was selected
            raise RuntimeError("simulated sampling failure")
        return unmask(self, logits, s, gen)

    monkeypatch.setattr(LLaDADenoiser, "unmask", flaky)
    bad = SamplingParams(max_tokens=16, steps=8, temperature=0.5, seed=13)
    outs = llm.generate(PROMPTS[:2] + ["A bad one"] + PROMPTS[2:], PARAMS[:2] + [bad] + PARAMS[2:],
                        use_tqdm=False)
    failed = outs[2]
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert failed.error == (f"request {failed.request_id!r} failed in sampling: "
                            f"RuntimeError: simulated sampling failure")
    assert _ids(outs[:2] + outs[3:]) == reference
    assert all(o.error is None for o in outs[:2] + outs[3:])
    _assert_clean(llm)


# ---------------------------------------------------------------- consistent outputs
def test_stop_string_cuts_token_ids_where_it_begins(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Hello", SamplingParams(max_tokens=16, steps=8), use_tqdm=False)[0].outputs[0]
    ids, text = base.token_ids, base.text
    for start in range(1, len(text) - 1, 3):
        needle = text[start:start + 2]
        out = llm.generate("Hello", SamplingParams(max_tokens=16, steps=8, stop=[needle]),
                           use_tqdm=False)[0]
        c = out.outputs[0]
        pos = text.find(needle)
        # the token the stop string begins in: the first whose text reaches past `pos`
        begins = next(t for t in range(len(ids)) if len(tok.decode(ids[:t + 1], skip_special_tokens=True)) > pos)
        assert c.text == text[:pos] and c.token_ids == ids[:begins]
        assert c.text.startswith(tok.decode(c.token_ids, skip_special_tokens=True))
        assert (c.finish_reason, c.stop_reason) == ("stop", needle)
        assert out.metrics.num_generated_tokens == len(c.token_ids)


def test_duplicate_request_id_refused_with_nothing_allocated(llm):
    eng = llm.llm_engine
    p = SamplingParams(max_tokens=16, steps=8)
    eng.add_request("Hello", p, request_id="dup")
    eng.step()   # running, pattern selected
    before = eng.scheduler.block_manager.stats()
    with pytest.raises(ValueError, match="request_id='dup' is already running or waiting"):
        eng.add_request("Hello again", p, request_id="dup")
    seq = eng.make_sequence("Other", p, request_id="other")
    eng.add_request("Third", p, request_id="other")
    with pytest.raises(ValueError, match="request_id='other' is already running or waiting"):
        eng.add_sequence(seq)   # made before another took its id
    assert eng.scheduler.block_manager.stats() == before
    assert sorted(eng.scheduler.request_ids()) == ["dup", "other"]
    eng.add_request("Auto", p)   # an engine-chosen id never collides with a caller's
    while eng.has_unfinished_requests():
        eng.step()
    _assert_clean(llm)
    eng.add_request("Hello", p, request_id="dup")   # finished: the id may be used again
    eng.abort_request("dup")


# ---------------------------------------------------------------- threads and interrupts
def test_concurrent_generate_calls_are_serialised(llm, reference):
    results, errors = {}, []

    def call(i):
        try:
            order = [(i + k) % 3 for k in range(3)]
            outs = llm.generate([PROMPTS[j] for j in order], [PARAMS[j] for j in order], use_tqdm=False)
            results[i] = dict(zip(order, _ids(outs)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all([r[j] for j in range(3)] == reference for r in results.values()) and len(results) == 6
    _assert_clean(llm)


def test_interrupts_leave_the_llm_correct(llm, reference, monkeypatch):
    rng = random.Random(0)
    step = LLMEngine.step
    for _ in range(6):
        at, before = rng.randrange(1, 9), rng.random() < 0.5
        count = [0]

        def interrupted(self):
            count[0] += 1
            if count[0] == at and before:
                raise KeyboardInterrupt
            out = step(self)
            if count[0] == at:
                raise KeyboardInterrupt   # after the step's work: its outputs are lost
            return out

        monkeypatch.setattr(LLMEngine, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        monkeypatch.setattr(LLMEngine, "step", step)
        assert not llm.llm_engine.has_unfinished_requests()
        assert _ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == reference
        _assert_clean(llm)
