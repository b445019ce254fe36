"""Per-request generation settings, checked on construction (errors name the bad value)."""
from __future__ import annotations

from dataclasses import dataclass, field

LLADA_POLICIES = ("low_confidence", "random")
DREAM_POLICIES = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclass
class SamplingParams:
    """How one request is denoised.

    max_tokens: generation length (the masked region appended to the prompt).
    steps: denoising steps over the whole request (None: one per token).
    block_length: semi-autoregressive block size (None: one block).
    unmasking: LLaDA `low_confidence` | `random`; Dream `origin` | `maskgit_plus` | `topk_margin` |
        `entropy`; None takes the model's generation_config, else the official default.
    alg_temp, eps: Dream's confidence temperature and final timestep.
    cfg_scale: unsupervised classifier-free guidance (a second canvas with the prompt masked).
    attention_config: per-request overrides of the engine's attention settings (e.g. SparseD's).
    """
    max_tokens: int = 128
    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    unmasking: str | None = None
    alg_temp: float | None = None
    eps: float = 1e-3
    cfg_scale: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    attention_config: dict | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.steps is None:
            self.steps = self.max_tokens
        if self.block_length is None:
            self.block_length = self.max_tokens
        self._check()

    def _check(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "must be an integer >= 1")
        if not isinstance(self.block_length, int) or self.block_length < 1:
            bad("block_length", "must be an integer >= 1")
        if self.max_tokens % self.block_length:
            bad("block_length", f"max_tokens={self.max_tokens} must be divisible by block_length")
        if self.steps % self.num_blocks:
            bad("steps", f"must be divisible by the number of blocks "
                         f"(max_tokens/block_length = {self.num_blocks})")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad("top_k", "must be None or an integer >= 1")
        if self.unmasking is not None and self.unmasking not in LLADA_POLICIES + DREAM_POLICIES:
            bad("unmasking", f"unknown policy; choose from {LLADA_POLICIES + DREAM_POLICIES}")
        if self.alg_temp is not None and self.alg_temp < 0:
            bad("alg_temp", "must be None or >= 0")
        if not 0 <= self.eps < 1:
            bad("eps", "must be in [0, 1)")
        if self.cfg_scale < 0:
            bad("cfg_scale", "must be >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.attention_config is not None and not isinstance(self.attention_config, dict):
            bad("attention_config", "must be a dict or None")

    @property
    def num_blocks(self) -> int:
        return self.max_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks
