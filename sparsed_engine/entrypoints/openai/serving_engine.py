"""What completions and chat share: model check, errors in OpenAI's format, running a request's
prompts through the AsyncLLM (validated together before any is queued), streaming deltas."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pydantic
from fastapi.responses import JSONResponse

from sparsed_engine.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from sparsed_engine.entrypoints.openai.metrics import ServerMetrics
from sparsed_engine.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, UnsupportedFieldError
from sparsed_engine.outputs import RequestOutput
from sparsed_engine.sampling_params import SamplingParams

logger = logging.getLogger("sparsed_engine.serve")
_PARAM_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)=")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str, param: str | None = None, code=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code or status))
    return JSONResponse(body.model_dump(), status_code=status)


def bad_request(e: Exception, prompt_param: str) -> APIError:
    """The engine's own validation error (SamplingParams, make_sequence) as a 400 naming the field."""
    if isinstance(e, UnsupportedFieldError):
        param = e.field
    elif isinstance(e, pydantic.ValidationError) and e.errors():
        param = ".".join(str(x) for x in e.errors()[0]["loc"]) or None
    elif m := _PARAM_IN_MESSAGE.search(str(e)):
        param = m.group(1)
    elif str(e).startswith("prompt"):
        param = prompt_param
    else:
        param = None
    return APIError(400, str(e), "BadRequestError", param)


def engine_error(e: Exception) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "ServiceUnavailableError", None, "queue_full")
    return APIError(503, str(e), "ServiceUnavailableError", None, "engine_dead")


def releasable(text: str, stops: list[str]) -> str:
    """The part of a committed prefix's text that no later token can change or cut: up to the first
    stop string, without an ending that may be the start of one or an incomplete UTF-8 character."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
            continue
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut].rstrip("\ufffd")


@dataclass
class Choice:
    """One prompt's request: its stream state and, at the end, its final output."""
    index: int
    stops: list[str]
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    sent: str = ""
    final: RequestOutput | None = None

    def delta(self, out: RequestOutput) -> str:
        """Text to send now: new releasable text, or at the finish whatever remains."""
        text = out.outputs[0].text
        if out.finished:
            if not text.startswith(self.sent):   # decoding a prefix is expected to give a prefix of the text
                logger.warning("request %s: streamed %r is not a prefix of the final text %r",
                               out.request_id, self.sent, text)
                return ""
            return text[len(self.sent):]   # the rest, never resending what was sent
        ready = releasable(text, self.stops)
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        new, self.sent = ready[len(self.sent):], ready
        return new


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_names: list[str], metrics: ServerMetrics):
        self.llm = llm
        self.model_names = model_names
        self.metrics = metrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join(self.model_names)}", "NotFoundError", "model", "model_not_found")

    async def start(self, request, prompts: list, request_id: str, prompt_param: str,
                    arrival: tuple | None = None) -> list:
        """Validate every prompt (400 naming the field) before queuing any; returns the sequences.
        `arrival`: the key ArrivalMiddleware announced the request under, ended once validated."""
        self.check_model(request.model)
        seqs = []
        try:
            request.check_supported()
            params: SamplingParams = request.sampling_params()
            for i, p in enumerate(prompts):
                seqs.append(await self.llm.add_request(p, params, f"{request_id}-{i}"))
        except BaseException as e:
            for seq in seqs:   # validated, but none of this request's prompts runs
                self.llm.discard(seq)
            if isinstance(e, (ValueError, TypeError)):
                err = bad_request(e, prompt_param)
                err.param = request.api_name(err.param)
                raise err from e
            if isinstance(e, (QueueFullError, EngineDeadError)):
                raise engine_error(e) from e
            raise
        finally:
            if arrival is not None:
                self.llm.request_arrived(arrival)   # the sequences (if any) now stand for it
        return seqs

    async def outputs(self, seqs: list) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every sequence's outputs as they come, merged; leaving early aborts the unfinished ones."""
        queue: asyncio.Queue = asyncio.Queue()
        choices = [Choice(i, seq.params.stop) for i, seq in enumerate(seqs)]

        async def pump(choice, seq):
            try:
                async for out in self.llm.stream(seq):
                    queue.put_nowait((choice, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((choice, e))

        tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, seqs)]
        try:
            remaining = len(seqs)
            while remaining:
                choice, item = await queue.get()
                if isinstance(item, Exception):
                    raise engine_error(item) if isinstance(item, EngineDeadError) else item
                if choice.first_token is None and item.outputs[0].token_ids:
                    choice.first_token = time.perf_counter()
                if item.finished:
                    remaining -= 1
                    choice.final = item
                    self._record(choice, item)
                yield choice, item
        finally:
            for t in tasks:
                t.cancel()   # an unfinished stream's cancellation aborts its request
            for choice in choices:
                if choice.final is None:
                    self.metrics.record_abort()

    def _record(self, choice: Choice, out: RequestOutput) -> None:
        now = time.perf_counter()
        first = choice.first_token if choice.first_token is not None else now
        self.metrics.record(out, first - choice.arrival, now - choice.arrival)


def usage(outs: list[RequestOutput]) -> dict:
    p = sum(len(o.prompt_token_ids) for o in outs)
    c = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj) -> str:
    body = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


async def until_disconnected(coro, raw_request):
    """Await coro; if the HTTP client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await raw_request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("the client disconnected")
