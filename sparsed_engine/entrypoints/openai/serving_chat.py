"""POST /v1/chat/completions: the tokenizer's chat template with the generation prompt, as LLM.chat."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sparsed_engine.entrypoints.openai.protocol import (ChatCompletionChoice, ChatCompletionChunk,
                                                        ChatCompletionRequest, ChatCompletionResponse,
                                                        ChatCompletionStreamChoice, ChatResponseMessage,
                                                        DeltaMessage, UnsupportedFieldError, UsageInfo, random_id)
from sparsed_engine.entrypoints.openai.serving_engine import APIError, OpenAIServing, bad_request, sse, usage


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, arrival: tuple | None = None):
        """A ChatCompletionResponse, or an async iterator of SSE lines when request.stream."""
        self.check_model(request.model)
        try:
            prompt = await asyncio.to_thread(self._render, request)
        except (ValueError, TypeError, UnsupportedFieldError) as e:
            raise bad_request(e, "messages") from e
        rid = random_id("chatcmpl")
        seqs = await self.start(request, [prompt], rid, "messages", arrival)
        model = request.model or self.model_names[0]
        if request.stream:
            return self._stream(request, seqs, rid, model)
        final = None
        async for _, out in self.outputs(seqs):
            final = out
        c = final.outputs[0]
        return ChatCompletionResponse(
            id=rid, model=model, usage=UsageInfo(**usage([final])),
            choices=[ChatCompletionChoice(index=0, message=ChatResponseMessage(content=c.text),
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

    def _render(self, request: ChatCompletionRequest) -> dict:
        tok = self.llm.tokenizer
        if tok is None:
            raise ValueError("messages: chat needs the tokenizer, which skip_tokenizer_init=True left out")
        text = tok.apply_chat_template([m.as_template_message() for m in request.messages],
                                       add_generation_prompt=request.add_generation_prompt, tokenize=False,
                                       **(request.chat_template_kwargs or {}))
        # the template writes the special tokens itself (as LLM.chat encodes it)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    async def _stream(self, request: ChatCompletionRequest, seqs, rid: str, model: str) -> AsyncIterator[str]:
        def chunk(delta: DeltaMessage, finish=None, usage_info=None, choices=True):
            return sse(ChatCompletionChunk(
                id=rid, model=model, usage=usage_info,
                choices=[ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)] if choices else []))

        yield chunk(DeltaMessage(role="assistant", content=""))
        finals = []
        try:
            async for choice, out in self.outputs(seqs):
                text = choice.delta(out)
                if text:
                    yield chunk(DeltaMessage(content=text))
                if out.finished:
                    finals.append(out)
                    yield chunk(DeltaMessage(), finish=out.outputs[0].finish_reason)
            if request.stream_options is not None and request.stream_options.include_usage:
                yield chunk(DeltaMessage(), usage_info=UsageInfo(**usage(finals)), choices=False)
        except APIError as e:
            yield sse({"error": {"message": str(e), "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"
