"""Timing one request's denoising steps through the engine itself (LLMEngine.step)."""
from __future__ import annotations

import statistics
import time

from sparsed_engine import LLM, SamplingParams


def timed_steps(llm: LLM, ids: list[int], params: SamplingParams, sync) -> list[tuple[str, float]]:
    """(attention phase, seconds) of every step of one request, run alone; `sync` waits for
    the device so each step's time is its own."""
    eng = llm.llm_engine
    seq = eng.make_sequence(ids, params)
    eng.add_sequence(seq)
    out = []
    while eng.has_unfinished_requests():
        phase = eng.scheduler.phase_of(seq)
        sync()
        t = time.perf_counter()
        eng.step()
        sync()
        out.append((phase, time.perf_counter() - t))
    return out


def median_of(steps, phase, skip_first=True) -> float:
    """Median time of one phase's steps, leaving out the first (warm-up) when there are others."""
    xs = [t for p, t in steps if p == phase]
    return statistics.median(xs[1:] if skip_first and len(xs) > 1 else xs)
