"""POST /v1/completions: one engine request per prompt (choice index = prompt index)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from sparsed_engine.entrypoints.openai.protocol import (CompletionChoice, CompletionRequest, CompletionResponse,
                                                        UsageInfo, random_id)
from sparsed_engine.entrypoints.openai.serving_engine import APIError, OpenAIServing, sse, usage


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, arrival: tuple | None = None):
        """A CompletionResponse, or an async iterator of SSE lines when request.stream."""
        rid = random_id("cmpl")
        seqs = await self.start(request, request.prompts(), rid, "prompt", arrival)
        model = request.model or self.model_names[0]
        if request.stream:
            return self._stream(request, seqs, rid, model)
        finals = [None] * len(seqs)
        async for choice, out in self.outputs(seqs):
            if out.finished:
                finals[choice.index] = out
        return CompletionResponse(
            id=rid, model=model, usage=UsageInfo(**usage(finals)),
            choices=[CompletionChoice(index=i, text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason,
                                      stop_reason=o.outputs[0].stop_reason) for i, o in enumerate(finals)])

    async def _stream(self, request: CompletionRequest, seqs, rid: str, model: str) -> AsyncIterator[str]:
        finals = []
        try:
            async for choice, out in self.outputs(seqs):
                text = choice.delta(out)
                if not text and not out.finished:
                    continue
                c = out.outputs[0]
                yield sse(CompletionResponse(id=rid, model=model, choices=[CompletionChoice(
                    index=choice.index, text=text, finish_reason=c.finish_reason if out.finished else None,
                    stop_reason=c.stop_reason if out.finished else None)]))
                if out.finished:
                    finals.append(out)
            if request.stream_options is not None and request.stream_options.include_usage:
                yield sse(CompletionResponse(id=rid, model=model, choices=[], usage=UsageInfo(**usage(finals))))
        except APIError as e:
            yield sse({"error": {"message": str(e), "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"
