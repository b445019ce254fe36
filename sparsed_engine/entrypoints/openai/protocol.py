"""OpenAI request and response bodies (pydantic), with the diffusion fields as extra body keys.

Unknown fields are rejected (extra="forbid"), and OpenAI fields this engine does not implement are
declared only so that a request setting them gets a 400 naming them, never a silent ignore. The
values of the sampling fields are checked by SamplingParams itself, not here.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparsed_engine.sampling_params import SamplingParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UnsupportedFieldError(ValueError):
    def __init__(self, field: str, value):
        super().__init__(f"{field}={value!r} is not supported by sparsed-engine")
        self.field = field


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# the sampling fields with the same name and meaning in SamplingParams (OpenAI's, then the diffusion ones)
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed", "steps", "block_length",
                    "unmasking", "top_k", "cfg_scale", "alg_temp", "eps", "attention_config",
                    "stop_token_ids", "threshold", "kv_cache")


class _SamplingRequest(OpenAIBaseModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # diffusion sampling fields (extra_body), as SamplingParams names them
    steps: int | None = None
    block_length: int | None = None
    unmasking: str | None = None
    top_k: int | None = None
    cfg_scale: float | None = None
    alg_temp: float | None = None
    eps: float | None = None
    attention_config: dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None
    threshold: float | None = None
    kv_cache: str | None = None   # none / prefix / dual; absent: the server's --kv-cache
    # OpenAI fields not implemented: allowed only at their "off" value
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    top_logprobs: int | None = None

    # field -> the values that mean "not used"
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                              "logit_bias": (None, {}), "logprobs": (None, False), "best_of": (None, 1),
                              "echo": (None, False), "suffix": (None, ""), "response_format": (None,),
                              "tools": (None, []), "tool_choice": (None, "none"),
                              "parallel_tool_calls": (None,), "top_logprobs": (None, 0), "n": (1,)}

    def check_supported(self) -> None:
        """A 400 for any OpenAI feature this engine does not implement (n > 1 included: a diffusion
        request is one canvas; send several requests instead)."""
        for name, off in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if name in self.model_fields_set and value not in off:
                raise UnsupportedFieldError(name, value)

    def max_tokens_value(self) -> int | None:
        return self.max_tokens

    def api_name(self, param: str | None) -> str | None:
        """The request field a SamplingParams field came from."""
        return param

    def sampling_params(self) -> SamplingParams:
        """The engine's own validation raises ValueError/TypeError naming the field."""
        kwargs = {name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None}
        if self.max_tokens_value() is not None:
            kwargs["max_tokens"] = self.max_tokens_value()
        return SamplingParams(**kwargs)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, p):
        if isinstance(p, list) and not p:
            raise ValueError("the prompt list is empty")
        return p

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")   # name, tool_call_id, ...: passed to the chat template
    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):  # OpenAI content parts: only text is meaningful to a text model
            bad = [part.get("type") for part in content if part.get("type") != "text"]
            if bad:
                raise UnsupportedFieldError("messages.content.type", bad[0])
            content = "".join(part.get("text", "") for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def max_tokens_value(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def api_name(self, param: str | None) -> str | None:
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return param


# ---------------------------------------------------------------- responses
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sparsed-engine"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
