"""Transfer schedules: how many tokens each step commits, per block and over the request."""
import pytest
import torch

from sparsed_engine import LLM, SamplingParams
from model_executor.denoisers.dream import dream_transfer_count
from model_executor.denoisers.llada import llada_transfer_schedule


def test_llada_schedule_literal():
    assert llada_transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert llada_transfer_schedule(8, 8) == [1] * 8
    assert llada_transfer_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert sum(llada_transfer_schedule(37, 7)) == 37


def test_dream_count_literal():
    ts = torch.linspace(1, 1e-3, 9)
    for i in range(8):
        expect = int(torch.tensor(12.0) * (1 - ts[i + 1] / ts[i])) if i < 7 else 12
        assert dream_transfer_count(12, i, 8, 1e-3) == expect


def _committed_per_step(llm, params):
    eng = llm.llm_engine
    rid = eng.add_request("Hello world", params)
    seq = next(s for s in eng.scheduler.waiting if s.request_id == rid)
    counts, masked = [], params.max_tokens
    while eng.has_unfinished_requests():
        eng.step()
        now = int((seq.canvas == eng.info.mask_token_id).sum())
        counts.append(masked - now)
        masked = now
    return counts


@pytest.mark.parametrize("steps,block", [(8, 4), (4, 16), (16, 16)])
def test_llada_engine_follows_schedule(tiny_llada_dir, steps, block):
    llm = LLM(model=str(tiny_llada_dir))
    counts = _committed_per_step(llm, SamplingParams(max_tokens=16, steps=steps, block_length=block))
    blocks = 16 // block
    expect = llada_transfer_schedule(block, steps // blocks) * blocks
    assert counts == expect


def test_dream_engine_follows_schedule(tiny_dream_dir):
    llm = LLM(model=str(tiny_dream_dir))
    counts = _committed_per_step(llm, SamplingParams(max_tokens=16, steps=6, unmasking="entropy"))
    masked, expect = 16, []
    for i in range(6):
        n = dream_transfer_count(masked, i, 6, 1e-3)
        expect.append(n)
        masked -= n
    assert counts == expect and masked == 0
