"""A KeyboardInterrupt at a random moment of `generate` leaves the LLM correct for the next call,
with every executor (the in-process one, mp and Ray with two CPU ranks): after each interrupt a
generate gives exactly what a fresh engine gives, and no pattern-pool block stays held."""
import random
import signal
import threading
import time

import pytest

from sparsed_engine import LLM, SamplingParams

try:
    import ray
except ImportError:
    ray = None

ROUNDS = 6
KW = dict(attention_backend="sparsed", attention_config={"block_size": 16}, mask_pool_bytes=1 << 20)
PROMPTS = [list(range(5, 42)), list(range(50, 63))]
PARAMS = [SamplingParams(max_tokens=64, steps=8, block_length=32),
          SamplingParams(max_tokens=32, steps=8, temperature=0.8, seed=3)]


class _Interrupter:
    """Sends SIGINT to the main thread after a delay, as Ctrl-C would; the handler raises
    KeyboardInterrupt only while armed, so a signal that comes after the call is ignored."""

    def __init__(self):
        self.armed = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def run(self, fn, delay: float) -> bool:
        """fn() with an interrupt `delay` s in; True when it was interrupted."""
        main = threading.main_thread().ident
        timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
        self.armed = True
        timer.start()
        interrupted = False
        try:
            try:
                fn()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                self.armed = False
                timer.cancel()
                timer.join()
        except KeyboardInterrupt:
            pass  # it landed after fn returned, before the disarm: fn had completed
        return interrupted

    def close(self):
        signal.signal(signal.SIGINT, self.previous)


def _token_ids(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def _timed_check(llm, reference, when: str = "") -> float:
    t0 = time.perf_counter()
    assert _token_ids(llm) == reference, f"wrong output {when}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(tiny_llada_dir):
    with LLM(device="cpu", model=str(tiny_llada_dir), **KW) as llm:
        return _token_ids(llm)


@pytest.mark.parametrize("executor", ["uni", "mp", pytest.param("ray", marks=pytest.mark.skipif(
    ray is None, reason="Ray is not installed"))])
def test_random_interrupts_leave_the_llm_correct(tiny_llada_dir, reference, executor):
    sp = 1 if executor == "uni" else 2
    rng = random.Random(executor)
    interrupter = _Interrupter()
    with LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=sp, distributed_executor_backend=executor,
             **KW) as llm:
        assert _token_ids(llm) == reference   # the first calls are slow (warm-up): not timed
        call_s = _timed_check(llm, reference)
        interrupted = 0
        try:
            for _ in range(ROUNDS):   # a delay within the last full call's time: a random moment of it
                interrupted += interrupter.run(lambda: _token_ids(llm), rng.uniform(0, 0.9 * call_s))
                call_s = _timed_check(llm, reference, f"after {interrupted} interrupts")
        finally:
            interrupter.close()
        assert interrupted >= ROUNDS // 4   # they land inside calls (a call may end first)
        assert llm.get_stats()["mask_pool"]["used_blocks"] == 0
