"""What generate() returns, shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" (EOS, stop token or stop string), "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    steps: int = 0                 # denoising steps run
    num_generated_tokens: int = 0  # tokens kept in the output

    @property
    def seconds(self) -> float | None:
        if self.finished_time is None or self.first_scheduled_time is None:
            return None
        return self.finished_time - self.first_scheduled_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None   # why the request failed (finish_reason "error"); the others are unaffected
