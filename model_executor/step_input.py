"""The plain data a worker receives for one denoising step (no requests, no scheduler objects),
and the plain data rank 0 sends back: committed positions and token ids, never logits."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention_backends.base import RowSpec


@dataclass
class RowInput:
    token_ids: torch.Tensor        # [L] canvas of this row (CPU, long)
    logits_positions: torch.Tensor  # [M] canvas positions whose logits are wanted (CPU, long)
    spec: RowSpec                  # attention plan of this row at this step


@dataclass
class RequestSampling:
    """How one request turns its rows' logits into committed tokens at this step.

    Its rows are `num_rows` consecutive entries of StepInput.rows (with classifier-free
    guidance: the conditional row, then the unconditional one) sharing one logits_positions.
    """
    request_id: str            # the engine's id, for error messages
    seq_id: int                # unique per request for the engine process's life: keys its generator
    seed: int                  # seeds the request's generator on its first step
    policy: str                # the family denoiser's unmasking policy
    num_transfer: int          # tokens to commit at this step (the denoiser's transfer schedule)
    transfer_prob: float       # per-position commit probability (Dream's `origin`), else 0
    temperature: float
    top_p: float
    top_k: int | None
    alg_temp: float | None
    cfg_scale: float
    num_rows: int              # 1, or 2 with classifier-free guidance
    threshold: float | None = None  # a threshold policy's: num_transfer is then the minimum to commit


@dataclass
class SampledTokens:
    """What one request committed at a step: canvas positions and their token ids, or why it failed."""
    positions: list[int]
    token_ids: list[int]
    error: str | None = None   # set when this request's sampling raised; the others are unaffected


@dataclass
class StepInput:
    rows: list[RowInput]
    # One per request, in row order. None asks for every row's logits instead (CPU tensors; a
    # diagnostic used by benchmarks that score logits, never by the engine).
    sampling: list[RequestSampling] | None = None
    # Requests that finished or were aborted since the last step: their generators are freed.
    finished_seq_ids: list[int] = field(default_factory=list)
