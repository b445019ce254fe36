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


def step_kind(seq) -> str:
    """'refresh' when a cache-mode request runs its whole canvas and stores its K/V (a block's first
    step), 'cached' when it computes only part of it, 'exact' for a request without a cache."""
    if seq.kv_cache == "none":
        return "exact"
    return "refresh" if seq.needs_refresh else "cached"


def timed_kv_steps(llm: LLM, ids: list[int], params: SamplingParams, sync,
                   max_steps: int) -> list[tuple[str, str, float]]:
    """(step kind, attention phase, seconds) of the first `max_steps` steps of one request run alone;
    the request is then aborted, so a long generation's step costs are measured without running it."""
    eng = llm.llm_engine
    seq = eng.make_sequence(ids, params)
    eng.add_sequence(seq)
    out = []
    try:
        while eng.has_unfinished_requests() and len(out) < max_steps:
            kind, phase = step_kind(seq), eng.scheduler.phase_of(seq)
            sync()
            t = time.perf_counter()
            eng.step()
            sync()
            out.append((kind, phase, time.perf_counter() - t))
    finally:
        if eng.has_unfinished_requests():
            eng.abort_request(seq.request_id)
    return out


def median_where(steps, phase: str, kind: str | None = None, skip_first: bool = True) -> float:
    """Median seconds of the steps of timed_kv_steps in `phase` (and of `kind`, unless None: an
    exact-mode request has no refresh or cached steps), leaving out the first when there are others
    (its first run at a shape carries one-time work)."""
    xs = [t for k, p, t in steps if p == phase and kind in (None, k)]
    if not xs:
        raise ValueError(f"no {kind} step in phase {phase!r} among {[(k, p) for k, p, _ in steps]}")
    return statistics.median(xs[1:] if skip_first and len(xs) > 1 else xs)


class StepClock:
    """Inside `with StepClock(llm, sync) as clock:`, every LLMEngine.step (generate's too) is timed,
    synchronised, and labelled by its batch: the step_kind its sequences share, else 'mixed';
    clock.steps holds (label, seconds)."""

    def __init__(self, llm: LLM, sync):
        self.engine, self.sync, self.steps = llm.llm_engine, sync, []

    def __enter__(self):
        engine, plain_step = self.engine, self.engine.step

        def step():
            sched = engine.scheduler
            # admission happens inside step(): waiting requests that join start with a refresh
            kinds = {step_kind(s) for s in (*sched.running, *sched.waiting)}
            label = kinds.pop() if len(kinds) == 1 else "mixed"
            self.sync()
            t = time.perf_counter()
            try:
                return plain_step()
            finally:
                self.sync()
                self.steps.append((label, time.perf_counter() - t))

        engine.step = step
        return self

    def __exit__(self, *exc):
        del self.engine.step   # the instance attribute goes; the class's method shows again

    def median(self, label: str) -> float:
        xs = [t for lab, t in self.steps if lab == label]
        if not xs:
            raise ValueError(f"no {label!r} step among {sorted({lab for lab, _ in self.steps})}")
        return statistics.median(xs)
