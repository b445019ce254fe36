"""What the engine asks of an executor, and the one failure policy of the executors of several ranks.

Every executor has `collective_rpc(method, *args)`: a Worker method (by name) or fn(worker, *args)
run on every rank, results in rank order. The engine's calls (`execute`, the pool) are built on it
here, once; where the workers run is each executor's business.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future

from attention_backends.base import KVPoolSpec, PoolSpec
from model_executor.step_input import StepInput

FAILURE_GRACE_S = 2.0   # after one rank fails, wait this long for the others to report why
WORKER_TIMEOUT_ENV = "SPARSED_WORKER_TIMEOUT_S"


class ExecutorDeadError(RuntimeError):
    """A worker died or failed (or the executor was shut down): no step can run any more."""


class Executor(ABC):
    @abstractmethod
    def collective_rpc(self, method, *args) -> list:
        """Run a Worker method (by name) or fn(worker, *args) on every rank; results in rank order."""

    def execute(self, step: StepInput):
        """Run one step; what rank 0's Worker.execute returns (on the CPU when it crossed processes)."""
        return self.collective_rpc("execute", step)[0]

    def available_pool_bytes(self, fraction: float) -> int:
        """Bytes the pattern pool may take on every worker (after the model is loaded)."""
        return min(self.collective_rpc("available_pool_bytes", fraction))

    def init_pool(self, spec: PoolSpec) -> None:
        """Allocate the pattern pool tensors on every worker."""
        self.collective_rpc("init_pool", spec)

    def pool_usage(self) -> dict:
        """Worker-side pool facts (bytes allocated) for engine stats, summed over ranks."""
        usages = self.collective_rpc("pool_usage")
        return {key: sum(u[key] for u in usages) for key in usages[0]}

    def init_kv_pool(self, spec: KVPoolSpec) -> None:
        """Allocate the paged KV pool tensors on every worker (throughput mode)."""
        self.collective_rpc("init_kv_pool", spec)

    def kv_pool_usage(self) -> dict:
        """Worker-side KV pool bytes allocated, summed over ranks."""
        usages = self.collective_rpc("kv_pool_usage")
        return {key: sum(u[key] for u in usages) for key in usages[0]}

    def shutdown(self) -> None:
        """Release workers and devices."""


def worker_timeout_s() -> float:
    """How long a call on the ranks may take before the group is declared hung (a step at 64k
    takes seconds; the first one also compiles kernels, and loading a model reads every weight)."""
    raw = os.environ.get(WORKER_TIMEOUT_ENV, "600")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{WORKER_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0 (and finite)")
    return value


def died(exit_code: int | None) -> str:
    """What a rank's death is called in errors (the exit code where the executor can know it)."""
    code = f"exit code {exit_code}: " if exit_code is not None else ""
    return f"its process died ({code}killed, out of memory or crashed)"


class _CallThread:
    """One daemon thread that runs an executor's calls, in order. The caller only waits for the
    result, so an interrupt (Ctrl-C) in the caller abandons the wait, never a half-sent request or
    a half-read answer; the abandoned call finishes on every rank before the next one starts."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def run(self, fn, *args):
        future = Future()
        self._jobs.put((future, fn, args))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - raised in the caller
                future.set_exception(e)


class MultiRankExecutor(Executor):
    """An executor of several ranks in other processes. Subclasses move requests and answers
    (`_pack`, `_send`, `_next`) and release their processes (`_release`); what counts as a failure
    and how it is named is decided here, once: a rank that dies, raises, or does not answer
    within timeout_s fails the whole group (its peers would block in collectives)."""
    name: str                 # in error texts: "mp", "Ray"
    num_ranks: int
    dead: str | None = None   # why no call can run any more, once a worker failed or shutdown ran

    def __init__(self):
        self.timeout_s = worker_timeout_s()
        self._calls: _CallThread | None = _CallThread(f"sparsed-{self.name}-calls")

    # ---------------------------------------------------------------- subclasses
    @abstractmethod
    def _pack(self, method, args: tuple):
        """The request, serialised once for every rank (in the caller's thread: an argument that
        cannot be sent fails here, before anything is sent)."""

    @abstractmethod
    def _send(self, request) -> None:
        """Hand the request to every rank."""

    @abstractmethod
    def _next(self, pending: set[int], timeout: float) -> tuple[int, str, object] | None:
        """(rank, status, value) of the next pending rank to answer the current call, status "ok",
        "error" (value: what it raised) or "died" (value: died(...)); None after `timeout` s."""

    @abstractmethod
    def _release(self) -> None:
        """Stop every rank (killing those that do not stop) and give back what was taken; idempotent."""

    # ---------------------------------------------------------------- Executor
    def collective_rpc(self, method, *args) -> list:
        self.check_alive()
        what = "running a step" if method == "execute" else f"running {getattr(method, '__name__', method)}"
        request = self._pack(method, args)
        return self._calls.run(self._call, request, what)

    def shutdown(self) -> None:
        if self._calls is None:
            return
        if self.dead is None:
            self.dead = f"the {self.name} executor was shut down"
        calls, self._calls = self._calls, None
        calls.run(self._release)   # after any call still running (one an interrupt abandoned)
        calls.stop()

    def check_alive(self) -> None:
        if self.dead is not None:
            raise ExecutorDeadError(self.dead)

    # ---------------------------------------------------------------- on the call thread
    def _call(self, request, what: str) -> list:
        self.check_alive()   # a call queued behind one that failed
        self._send(request)
        return self._gather(what)

    def _gather(self, what: str, ranks=None) -> list:
        """One answer per rank (of `ranks`, default all), or the group is released and
        ExecutorDeadError raised naming the rank and why: the first failure, a death preferred
        (a dead process outranks the broken collectives it leaves its peers in), or the ranks
        still busy after timeout_s."""
        ranks = list(range(self.num_ranks)) if ranks is None else list(ranks)
        results, pending = {}, set(ranks)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            got = self._next(pending, max(deadline - time.monotonic(), 0))
            if got is None:
                self._fail(f"worker rank {', '.join(map(str, sorted(pending)))} did not answer within "
                           f"{self.timeout_s:g} s while {what} (hung; {WORKER_TIMEOUT_ENV} sets the limit)")
            rank, status, value = got
            pending.discard(rank)
            if status == "ok":
                results[rank] = value
                continue
            failures = {rank: (status, value)}
            while pending:   # the peers of a failed rank fail too, soon
                got = self._next(pending, FAILURE_GRACE_S)
                if got is None:
                    break
                pending.discard(got[0])
                if got[1] != "ok":
                    failures[got[0]] = got[1:]
            rank, (_, why) = min(failures.items(), key=lambda kv: (kv[1][0] != "died", kv[0]))
            self._fail(f"worker rank {rank} failed while {what}: {why}")
        return [results[r] for r in ranks]

    def _fail(self, why: str):
        self.dead = f"the {self.name} executor is dead: {why}"
        self._release()
        raise ExecutorDeadError(self.dead)
