"""Per-request generation settings: strict, checked on construction, immutable afterwards (errors
name the bad value). Unmasking policy names are each model family's business, checked when a
request is added."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from sparsed_engine.validation import InvalidTypeError, OptionalDict, StrictModel

SEED_MAX = 2**63 - 1  # a torch.Generator seed, with room for per-row offsets
# Logits are divided by a temperature: below this a float32 division overflows to inf (NaN
# probabilities), so a temperature is 0 (greedy) or at least this. Guidance is capped likewise.
MIN_TEMPERATURE = 1e-5
MAX_CFG_SCALE = 1000.0
CONFIDENCE_THRESHOLD = "confidence_threshold"  # the policy `threshold` belongs to (both families offer it)

PositiveInt = Annotated[int, Field(ge=1)]
KV_CACHE_MODES = ("none", "prefix", "dual")   # exact mode, then Fast-dLLM's two block-wise caches


class SamplingParams(StrictModel):
    """How one request is denoised."""

    max_tokens: PositiveInt = 128
    """Generation length: the masked region appended to the prompt."""
    steps: PositiveInt | None = None
    """Denoising steps over the whole request (None: one per token); divisible by the number of blocks."""
    block_length: PositiveInt | None = None
    """Semi-autoregressive block size (None: one block); must divide max_tokens."""
    temperature: Annotated[float, Field(ge=0)] = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: PositiveInt | None = None
    """Keep only the k most likely tokens (None: all)."""
    unmasking: Annotated[str, Field(min_length=1)] | None = None
    """Unmasking policy, checked by the model family (LLaDA: low_confidence, random; Dream: origin,
    maskgit_plus, topk_margin, entropy; both: confidence_threshold, which needs threshold); None takes
    the model's generation_config, else the family's default."""
    alg_temp: Annotated[float, Field(ge=0)] | None = None
    """Dream: temperature of the confidence used to choose positions (None: the family's default)."""
    eps: Annotated[float, Field(ge=0, lt=1)] = 1e-3
    """Dream: final timestep of the transfer schedule."""
    cfg_scale: Annotated[float, Field(ge=0, le=MAX_CFG_SCALE)] = 0.0
    """Unsupervised classifier-free guidance (a second canvas with the prompt masked); 0: off."""
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    """Seed of this request's sampling (None: random); the same seed gives the same output."""
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default_factory=list)
    """Strings that end the output (not included); a single string or a list."""
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    """Token ids that end the output (besides the model's EOS)."""
    attention_config: OptionalDict = None
    """Per-request overrides of the engine's attention settings (e.g. SparseD's skip, select)."""
    threshold: Annotated[float, Field(gt=0)] | None = None
    """unmasking=confidence_threshold only (Fast-dLLM's parallel decoding): each step commits every
    masked position of the block whose confidence is >= threshold, and at least the most confident
    one; a block ends when it has no mask left (at the latest after its steps/blocks steps, the last
    committing all that remain), so a request may take fewer steps than `steps` (its output's
    metrics.steps says how many). Above 1 nothing reaches it: one token a step."""
    kv_cache: Literal[KV_CACHE_MODES] | None = None
    """Throughput mode of this request: none (exact), prefix or dual (Fast-dLLM's block-wise KV cache,
    refreshed at the first step of each block); None: the engine's kv_cache."""

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        """steps and block_length default to max_tokens (when that is a valid int)."""
        if isinstance(data, dict):
            mt = data.get("max_tokens", 128)
            if type(mt) is int:
                data = dict(data)
                for name in ("steps", "block_length"):
                    if data.get(name) is None:
                        data[name] = mt
            if isinstance(data.get("stop"), str):
                data = {**data, "stop": [data["stop"]]}
        return data

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_list(cls, v):
        return [] if v is None else v

    def check(self) -> None:
        for name in ("temperature", "alg_temp"):
            value = getattr(self, name)
            if value and value < MIN_TEMPERATURE:
                raise self.bad(name, f"must be 0 or at least {MIN_TEMPERATURE:g} (smaller overflows the logits)")
        if self.unmasking == CONFIDENCE_THRESHOLD and self.threshold is None:
            raise self.bad("threshold", f"unmasking={CONFIDENCE_THRESHOLD!r} needs a threshold")
        if self.threshold is not None and self.unmasking not in (None, CONFIDENCE_THRESHOLD):
            raise self.bad("threshold", f"applies to unmasking={CONFIDENCE_THRESHOLD!r} only, "
                                        f"not {self.unmasking!r}")
        if self.max_tokens % self.block_length:
            raise self.bad("block_length", f"max_tokens={self.max_tokens} must be divisible by block_length")
        if self.steps % self.num_blocks:
            raise self.bad("steps", f"must be divisible by the number of blocks "
                                    f"(max_tokens/block_length = {self.num_blocks})")

    @property
    def num_blocks(self) -> int:
        return self.max_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def validated(params) -> SamplingParams:
    """The request's SamplingParams checked again as it is added (nothing done to it since
    construction gets past the rules)."""
    if not isinstance(params, SamplingParams):
        raise InvalidTypeError(f"sampling_params={params!r:.80} must be a SamplingParams, got {type(params).__name__}")
    return params.revalidated()
