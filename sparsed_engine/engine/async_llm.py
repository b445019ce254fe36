"""AsyncLLM: an LLMEngine driven by one loop thread, for many concurrent callers (the server).

The loop thread owns the engine (and through it the executor and the GPU): it steps while any
request is unfinished, and only between two steps does it take in new requests and aborts, so
requests join the running batch at the next step boundary (step-level continuous batching; the
scheduler still decides admission). An idle loop woken by a request first gathers the burst it came
with (requests still being validated, or arriving less than `burst_gap_s` apart, for at most
`admission_window_s`), so requests sent together start in the same step and run as one batch.

`from_engine_args` builds the engine on the loop thread itself, so that all of the engine's torch
work (loading, steps, and the executor's shutdown) runs in one thread. With OpenMP (torch's CPU threads), every thread that runs a
parallel region keeps its own pool of worker threads, and once the pools together outnumber the cores,
libgomp stops spinning and wakes its workers through the kernel in every region: on CPU
(benchmarks/serve.py, bundled model, one batch of 32 dual-cache requests; benchmarks/RESULTS.md) an
engine loaded in the main thread and stepped in the loop thread spent 12.8 s in steps against
offline `LLM.generate`'s 7.9 s, and 8.2 s when the loop thread built it.

The loop thread does as little as it can besides steps: after each step it snapshots every stream's
*committed contiguous prefix* (generated tokens before the first still-masked position) when it grew,
and hands all of a step's outputs to each caller's event loop in one call. Detokenizing happens in
the caller's task, which skips prefixes a newer one has already replaced. Request validation
(`LLMEngine.make_sequence`, which allocates nothing) runs in the caller's task too, so a bad request
fails alone and at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from sparsed_engine.config import DEFAULT_MODEL, EngineConfig
from sparsed_engine.engine.llm_engine import LLMEngine, Prompt
from sparsed_engine.engine.sequence import Sequence
from sparsed_engine.executor.base import ExecutorDeadError
from sparsed_engine.outputs import CompletionOutput, RequestOutput
from sparsed_engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped (the executor died, or a step failed): no request can run any more."""


class QueueFullError(RuntimeError):
    """More requests wait for admission than max_waiting allows."""


ADMISSION_WINDOW_S = 0.05   # the longest an idle engine waits to gather a burst of requests
BURST_GAP_S = 0.005         # a request arriving within this of the previous one belongs to its burst


@dataclasses.dataclass
class _Stream:
    seq: Sequence
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    stops: frozenset = frozenset()   # token ids that end the output (EOS and the request's own)
    sent_tokens: int = 0             # length of the committed prefix last reported

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclasses.dataclass(frozen=True)
class _Prefix:
    """A grown committed prefix, snapshotted on the loop thread; decoded by the stream's reader."""
    ids: list[int]


def _deliver(items: list) -> None:
    for out, item in items:
        out.put_nowait(item)


class AsyncLLM:
    """`async for out in llm.generate(prompt, params, request_id)`: outputs as the prefix grows,
    the last one with `finished=True`; `llm.abort(request_id)` ends a request at the next step
    boundary and frees its pattern-pool blocks; `llm.shutdown()` stops the loop and the executor."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int | None = None,
                 admission_window_s: float = ADMISSION_WINDOW_S, burst_gap_s: float = BURST_GAP_S):
        """`engine`: a built LLMEngine, or a function that builds one, which the loop thread then
        calls (from_engine_args does: see the module notes); its errors are raised here."""
        if not isinstance(engine, LLMEngine) and not callable(engine):
            raise TypeError(f"engine={engine!r}: must be an LLMEngine or a function that builds one")
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"max_waiting={max_waiting!r}: must be None or an integer >= 0")
        for name, value in (("admission_window_s", admission_window_s), ("burst_gap_s", burst_gap_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name}={value!r}: must be a finite number of seconds >= 0")
        self.admission_window_s = float(admission_window_s)
        self.burst_gap_s = float(burst_gap_s)
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}   # owned by the loop thread
        self._pending_adds = 0                   # requests handed over but not yet in the engine
        self._validating = 0                     # add_request calls still checking their request
        # requests on their way to the loop -> since when: ("seq", seq_id) validated but not yet
        # streamed, ("call", n) announced by a front end (an HTTP request whose body is being read)
        self._incoming: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.dead: BaseException | None = None
        self._closed = False
        self.num_steps = 0
        self.step_seconds = 0.0                  # wall time spent inside engine.step (the rest is serving)
        ready, failed = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(engine, ready, failed),
                                        name="sparsed-engine-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._closed = True
            raise failed[0]

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._stop_ids = frozenset(engine.eos_token_ids)
        self.stats = engine.get_stats()          # refreshed by the loop after every step

    @classmethod
    def from_engine_args(cls, model: str | None = None, max_waiting: int | None = None,
                         admission_window_s: float = ADMISSION_WINDOW_S, burst_gap_s: float = BURST_GAP_S,
                         **kwargs) -> "AsyncLLM":
        config = EngineConfig(model=str(DEFAULT_MODEL) if model is None else model, **kwargs)  # errors here, at once
        return cls(lambda: LLMEngine(config), max_waiting, admission_window_s, burst_gap_s)

    # ---------------------------------------------------------------- callers (any event loop)
    @property
    def is_healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def num_waiting(self) -> int:
        return self.stats["num_waiting"] + self._pending_adds

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate (ValueError/TypeError naming the value, before anything is queued), queue, stream.

        Leaving the iteration early (the consumer is cancelled, e.g. its HTTP client went away)
        aborts the request."""
        seq = await self.add_request(prompt, params, request_id)
        async for out in self.stream(seq):
            yield out

    async def add_request(self, prompt: Prompt, params: SamplingParams,
                          request_id: str | None = None) -> Sequence:
        """Validate one request; pass it to `stream(seq)` to run it and read its outputs, or to
        `discard(seq)` when it will not run (an idle engine waits a little for validated requests)."""
        self._check_accepting()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        with self._lock:
            self._validating += 1
        try:
            # tokenizing a long prompt takes a while: off the event loop, beside the engine loop
            seq = await asyncio.to_thread(self.engine.make_sequence, prompt, params, rid)
            self._check_accepting()
        except BaseException:
            with self._lock:
                self._validating -= 1
            raise
        with self._lock:
            self._validating -= 1
            self._incoming[("seq", seq.seq_id)] = time.monotonic()
        return seq

    def discard(self, seq: Sequence) -> None:
        """A validated request that will not be streamed (e.g. another prompt of its HTTP request failed)."""
        with self._lock:
            self._incoming.pop(("seq", seq.seq_id), None)

    def expect_request(self) -> tuple:
        """A front end announces a request before it can call add_request (the server, as soon as
        an HTTP request begins), so that an idle engine gathering a burst waits for it too.
        Pass the returned key to `request_arrived` once add_request has returned (or failed)."""
        key = ("call", next(self._ids))
        with self._lock:
            self._incoming[key] = time.monotonic()
        return key

    def request_arrived(self, key: tuple) -> None:
        with self._lock:
            self._incoming.pop(key, None)

    def _arriving(self) -> bool:
        """Requests on their way to the loop: being validated, validated but not yet streamed, or
        announced; each only for the admission window (one that never comes stops counting then)."""
        with self._lock:
            old = time.monotonic() - self.admission_window_s
            for key in [k for k, t in self._incoming.items() if t < old]:
                del self._incoming[key]
            return bool(self._validating or self._incoming)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        out: asyncio.Queue = asyncio.Queue()
        stops = self._stop_ids | frozenset(seq.params.stop_token_ids)
        with self._lock:
            self._pending_adds += 1
            self._commands.put(("add", _Stream(seq, out, asyncio.get_running_loop(), stops)))
            self._incoming.pop(("seq", seq.seq_id), None)
        if self.dead is not None:   # the loop died after our check: nobody else drains the queue
            self._fail_commands(EngineDeadError(f"the engine is dead: {self.dead}"))
        finished = False
        try:
            while True:
                item = await out.get()
                while isinstance(item, _Prefix) and not out.empty():
                    item = out.get_nowait()   # a newer prefix (or the end) replaces this one unread
                if isinstance(item, _Prefix):
                    item = self._partial_output(seq, item.ids)
                elif isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        """End the request at the next step boundary (its stream gets a final 'abort' output)."""
        self._commands.put(("abort", request_id))

    async def run_in_loop(self, fn: Callable[[LLMEngine], object]):
        """fn(engine) on the loop thread at the next step boundary (e.g. get_stats, which may call workers)."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        fut = asyncio.get_running_loop().create_future()
        self._commands.put(("call", (fn, fut)))
        if self.dead is not None:   # the loop died after our check: nobody else drains the queue
            self._fail_commands(EngineDeadError(f"the engine is dead: {self.dead}"))
        return await fut

    async def check_health(self) -> None:
        """An idle engine asks its workers (through get_stats) so that it notices a killed one too
        (a dead worker ends the loop); a busy one learns it from its next step without waiting."""
        if self.stats["num_running"] == 0 and self.num_waiting() == 0:
            await self.run_in_loop(lambda engine: engine.get_stats())

    def shutdown(self) -> None:
        """Stop the loop (pending requests end with EngineDeadError); the loop thread releases the
        executor on its way out (a dead loop already has). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join()

    def _check_accepting(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting()} requests are waiting for admission, the limit "
                                 f"(max_waiting={self.max_waiting}); retry later")

    # ---------------------------------------------------------------- the loop thread
    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], ready: threading.Event, failed: list) -> None:
        try:
            built = engine if isinstance(engine, LLMEngine) else engine()
            if not isinstance(built, LLMEngine):
                raise TypeError(f"engine={engine!r} returned {built!r}, not an LLMEngine")
            self._attach(built)
        except BaseException as e:  # noqa: BLE001 - raised in the constructing thread
            failed.append(e)
            return
        finally:
            ready.set()
        engine = self.engine
        try:
            while True:
                busy = engine.has_unfinished_requests()
                commands = [] if busy else [self._commands.get()]   # idle: sleep until work arrives
                if commands and commands[0][0] == "add":
                    self._gather_burst(commands)
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if not all([self._handle(c) for c in commands]):   # every one handled, then stop
                    raise EngineDeadError("the engine was shut down")
                if not engine.has_unfinished_requests():
                    self.stats = engine.get_stats(workers=False)   # an abort may have emptied the engine
                    continue
                t0 = time.perf_counter()
                finished = engine.step()
                self.step_seconds += time.perf_counter() - t0
                self.num_steps += 1
                self.stats = engine.get_stats(workers=False)   # no call to the ranks on every step
                self._publish(finished)
        except BaseException as e:  # noqa: BLE001 - a failed step ends every request, not the process
            self.dead = e
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(f"the engine is dead: {type(e).__name__}: {e}")
            for stream in self._streams.values():
                stream.put(err)
            self._streams.clear()
            self._fail_commands(err)
        finally:
            # the thread that built the engine releases it: a Ray started here and shut down from
            # another thread left Ray's core in this process asking for its GCS, then aborting it
            engine.shutdown()

    def _gather_burst(self, commands: list) -> None:
        """Requests sent together reach the loop a little apart (HTTP parsing, validation in other
        threads): wait for the rest of the burst so that they start in the same step, rather than
        the first running a step alone and the rest following one step behind it."""
        deadline = time.monotonic() + self.admission_window_s
        while commands[-1][0] != "stop":
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                commands.append(self._commands.get(timeout=min(self.burst_gap_s, left)))
            except queue.Empty:
                if not self._arriving():
                    return

    def _handle(self, command) -> bool:
        kind, arg = command
        if kind == "add":
            with self._lock:
                self._pending_adds -= 1
            rid = arg.seq.request_id
            if rid in self._streams:
                arg.put(ValueError(f"request_id={rid!r} is already running; request ids must be unique"))
            else:
                self.engine.add_sequence(arg.seq)
                self._streams[rid] = arg
        elif kind == "abort":
            stream = self._streams.pop(arg, None)
            out = self.engine.abort_request(arg)
            if stream is not None and out is not None:
                stream.put(out)
        elif kind == "call":
            fn, fut = arg
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                fut.get_loop().call_soon_threadsafe(_settle, fut, None, e)
                if isinstance(e, ExecutorDeadError):
                    raise   # a probe that found a dead worker ends the loop as a failed step does
            else:
                fut.get_loop().call_soon_threadsafe(_settle, fut, result, None)
        return kind != "stop"

    def _fail_commands(self, err: BaseException) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending_adds -= 1
                arg.put(err)
            elif kind == "call":
                arg[1].get_loop().call_soon_threadsafe(_settle, arg[1], None, err)

    def _publish(self, finished: list[RequestOutput]) -> None:
        """Everything this step produced, in one hand-off per caller event loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in finished:
            stream = self._streams.pop(out.request_id, None)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.out, out))
        for stream in self._streams.values():
            grown = self._grown_prefix(stream)
            if grown is not None:
                batches.setdefault(stream.loop, []).append((stream.out, _Prefix(grown)))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    @staticmethod
    def _grown_prefix(stream: _Stream) -> list[int] | None:
        """The committed prefix (generated tokens before the first still-masked position, cut at
        the first stop token) when it grew since last reported; only the new part is scanned."""
        seq = stream.seq
        start = seq.prompt_len + stream.sent_tokens
        mask = seq.mask_token_id
        n = stream.sent_tokens
        for t in seq.canvas[start:].tolist():
            if t == mask or t in stream.stops:
                break
            n += 1
        if n == stream.sent_tokens:
            return None
        stream.sent_tokens = n
        return seq.canvas[seq.prompt_len:seq.prompt_len + n].tolist()

    def _partial_output(self, seq: Sequence, ids: list[int]) -> RequestOutput:
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt,
                             prompt_token_ids=seq.prompt_token_ids,
                             outputs=[CompletionOutput(0, text, ids)], finished=False)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
