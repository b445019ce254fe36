"""Sampling runs where the logits are: a worker returns committed positions and token ids only."""
import pickle

import pytest
import torch

from model_executor.step_input import SampledTokens
from model_executor.worker import Worker
from sparsed_engine import LLM, SamplingParams


def _walk(obj):
    yield obj
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _walk(x)
    elif hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            yield from _walk(x)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_worker_returns_no_vocabulary_wide_floats(request, monkeypatch, family):
    model = str(request.getfixturevalue(f"tiny_{family}_dir"))
    llm = LLM(model=model, attention_backend="sparsed", attention_config={"block_size": 16},
              mask_pool_bytes=1 << 20)
    vocab = llm.llm_engine.info.vocab_size
    returned, sent = [], []
    execute = Worker.execute

    def spy(self, step):
        out = execute(self, step)
        sent.append(step)
        returned.append(out)
        return out

    monkeypatch.setattr(Worker, "execute", spy)
    params = [SamplingParams(max_tokens=32, steps=8, block_length=16, cfg_scale=1.0),
              SamplingParams(max_tokens=16, steps=8, temperature=0.8, seed=1)]
    outs = llm.generate(["Hello world", "Two plus two"], params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert returned and len(returned) == len(sent)
    for step, out in zip(sent, returned):
        assert isinstance(out, list) and all(isinstance(r, SampledTokens) for r in out)
        assert len(out) == len(step.sampling)
        for x in _walk(out):
            assert not isinstance(x, torch.Tensor), "a worker returned a tensor"
            assert not isinstance(x, float)
        for r in out:
            assert r.error is None and len(r.positions) == len(r.token_ids)
            assert all(isinstance(t, int) and 0 <= t < vocab for t in r.token_ids)
        # what crosses a process boundary: the ids, never a [positions x vocab] float tensor
        assert len(pickle.dumps(out)) < 64 * 64


def test_generators_live_on_the_worker_and_are_freed(tiny_llada_dir):
    llm = LLM(model=str(tiny_llada_dir))
    worker = llm.llm_engine.executor.worker
    p = SamplingParams(max_tokens=16, steps=8, temperature=0.9, seed=7)
    first = llm.generate(["Hello", "Two"], p, use_tqdm=False)
    assert worker.sampler.generators == {}   # the last step's finishers are told at once when idle
    eng = llm.llm_engine
    eng.add_request("Hello", p, request_id="a")
    eng.step()
    assert len(worker.sampler.generators) == 1
    eng.abort_request("a")
    eng.add_request("Hello", p, request_id="a")   # the same id again: a fresh, equally seeded generator
    while eng.has_unfinished_requests():
        done = eng.step()
    assert done[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert worker.sampler.generators == {}
    assert not any(isinstance(v, torch.Generator) for v in vars(eng).values())
