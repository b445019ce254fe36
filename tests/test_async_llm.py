"""AsyncLLM's construction: the loop thread builds the engine it owns (all of the engine's torch work
in one thread), and a failed build is raised to the caller with no loop left running."""
import asyncio
import threading

import pytest

from sparsed_engine.engine import async_llm
from sparsed_engine.engine.async_llm import AsyncLLM
from sparsed_engine.engine.llm_engine import LLMEngine
from sparsed_engine.sampling_params import SamplingParams


def test_from_engine_args_builds_the_engine_on_the_loop_thread(monkeypatch):
    built_on = []

    class Recording(LLMEngine):
        def __init__(self, config):
            built_on.append(threading.current_thread())
            super().__init__(config)

    monkeypatch.setattr(async_llm, "LLMEngine", Recording)
    llm = AsyncLLM.from_engine_args(max_model_len=64)
    try:
        assert built_on == [llm._thread] and built_on[0] is not threading.current_thread()
        assert isinstance(llm.engine, Recording) and llm.tokenizer is llm.engine.tokenizer
        assert llm.is_healthy
    finally:
        llm.shutdown()
    assert not llm._thread.is_alive()


def test_a_failed_build_is_raised_and_leaves_no_loop():
    before = set(threading.enumerate())

    def broken():
        raise ValueError("max_model_len=7: too short for this test")

    with pytest.raises(ValueError, match="max_model_len=7"):
        AsyncLLM(broken)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "sparsed-engine-loop"]


def test_bad_options_fail_before_any_thread_and_a_non_engine_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_num_seqs"):
        AsyncLLM.from_engine_args(max_num_seqs=0)
    with pytest.raises(Exception, match=str(tmp_path / "missing")):
        AsyncLLM.from_engine_args(model=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="engine=42"):
        AsyncLLM(42)
    with pytest.raises(TypeError, match="returned 42, not an LLMEngine"):
        AsyncLLM(lambda: 42)


def test_an_engine_built_on_the_loop_thread_can_start_and_release_its_own_ray(tiny_llada_dir):
    """Ray's start-up from a thread other than the main one (the loop thread builds the engine)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sparsed-engine[ray]')")
    assert not ray.is_initialized()
    llm = AsyncLLM.from_engine_args(model=str(tiny_llada_dir), device="cpu", sequence_parallel_size=2,
                                    distributed_executor_backend="ray")
    try:
        async def one():
            async for out in llm.generate({"prompt_token_ids": list(range(5, 30))},
                                          SamplingParams(max_tokens=8, steps=4, block_length=8), "r0"):
                last = out
            return last

        assert asyncio.run(one()).finished and ray.is_initialized()
    finally:
        llm.shutdown()
    assert not ray.is_initialized()
