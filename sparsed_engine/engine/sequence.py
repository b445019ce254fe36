"""A request's canvas and where it stands in its denoising schedule."""
from __future__ import annotations

import enum
import itertools
import os
import time

import torch

from model_executor.denoisers.base import Denoiser
from model_executor.step_input import RequestSampling
from sparsed_engine.outputs import RequestMetrics
from sparsed_engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt tokens followed by `max_tokens` mask tokens, decoded block by block.

    `step` counts denoising steps over the whole request (across blocks), as SparseD counts them.
    Its family's denoiser says how many tokens each step commits; rank 0's worker chooses them.
    Under a threshold policy the worker also decides how many (at least the plan's count), so a
    block ends as soon as it has no mask left, before its `steps_per_block` if it empties early.

    Throughput mode (`kv_cache` prefix or dual): the first step of a block that runs is a refresh
    (the whole canvas, every layer's K/V stored in the row's pages); the block's other steps are
    cached steps computing only `computed_span()`. (A step that would commit nothing is skipped, as
    in exact mode, so the refresh is the block's first step that runs: it sees the same canvas.)
    """
    _seq_ids = itertools.count()   # unique in this process, unlike request ids, which may be reused

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, denoiser: Denoiser, policy: str, mask_token_id: int,
                 attention_config, pattern_blocks: int, kv_cache: str = "none", kv_pages: int = 0):
        self.request_id = request_id
        self.seq_id = next(Sequence._seq_ids)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.denoiser = denoiser
        self.policy = policy
        self.ends_blocks_when_empty = policy in denoiser.threshold_policies
        self.mask_token_id = mask_token_id
        self.attention_config = attention_config
        self.pattern_blocks_needed = pattern_blocks   # 0: this request never needs a pattern
        self.pattern_blocks: tuple[int, ...] = ()
        self.kv_cache = kv_cache                  # none (exact), prefix or dual
        self.kv_pages_needed = kv_pages           # over all rows; 0 in exact mode
        self.kv_pages: tuple[tuple[int, ...], ...] = ()   # per row, from admission on
        self.kv_block: int | None = None          # the block whose refresh the pages hold
        self.prompt_len = len(prompt_token_ids)
        self.canvas = torch.tensor(prompt_token_ids + [mask_token_id] * params.max_tokens,
                                   dtype=torch.long)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.step = 0
        self.block = 0
        self.step_in_block = 0
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.metrics = RequestMetrics(arrival_time=time.time())

    # ---------------------------------------------------------------- shape
    @property
    def total_steps(self) -> int:
        return self.params.steps

    @property
    def num_rows(self) -> int:
        """Canvas rows per forward: two with classifier-free guidance."""
        return 2 if self.params.cfg_scale > 0 else 1

    @property
    def num_tokens(self) -> int:
        return self.canvas.numel() * self.num_rows

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_region(self) -> tuple[int, int]:
        start = self.prompt_len + self.block * self.params.block_length
        return start, start + self.params.block_length

    def masked_positions(self) -> torch.Tensor:
        """Still-masked canvas positions of the current block, the only ones this step may commit."""
        s, e = self.block_region()
        return (self.canvas[s:e] == self.mask_token_id).nonzero().squeeze(-1) + s

    @property
    def needs_refresh(self) -> bool:
        """Throughput mode, and the pages do not hold this block's refresh yet."""
        return self.kv_cache != "none" and self.kv_block != self.block

    def computed_span(self) -> tuple[int, int] | None:
        """Canvas positions this step computes: None (all) in exact mode and on a refresh; else
        the block (dual) or the block and everything after it (prefix), starting `logits_shift`
        earlier (Dream: the logits of the block's first position come from the hidden state before it)."""
        if self.kv_cache == "none" or self.needs_refresh:
            return None
        s, e = self.block_region()
        s -= self.denoiser.logits_shift
        return (s, e) if self.kv_cache == "dual" else (s, self.canvas.numel())

    def rows(self) -> list[torch.Tensor]:
        if self.num_rows == 1:
            return [self.canvas]
        uncond = self.canvas.clone()
        uncond[:self.prompt_len] = self.mask_token_id
        return [self.canvas, uncond]

    # ---------------------------------------------------------------- schedule
    def transfer_plan(self, num_masked: int) -> tuple[int, float]:
        """(tokens to commit, per-position commit probability) at the current step."""
        return self.denoiser.plan(num_masked, self.step_in_block, self.params, self.policy)

    def sampling(self, num_transfer: int, transfer_prob: float) -> RequestSampling:
        """What rank 0's worker needs to commit this step's tokens."""
        p = self.params
        return RequestSampling(
            request_id=self.request_id, seq_id=self.seq_id, seed=self.seed, policy=self.policy,
            num_transfer=num_transfer, transfer_prob=transfer_prob, temperature=p.temperature,
            top_p=p.top_p, top_k=p.top_k, alg_temp=p.alg_temp, cfg_scale=p.cfg_scale, num_rows=self.num_rows,
            threshold=p.threshold)

    # ---------------------------------------------------------------- progress
    def commit(self, positions: list[int], tokens: list[int]) -> None:
        self.canvas[torch.tensor(positions, dtype=torch.long)] = torch.tensor(tokens, dtype=torch.long)

    def fail(self, error: str) -> None:
        """This request's step raised (on the worker): it ends here, the others go on."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.error = "error", error

    def advance(self) -> None:
        self.step += 1
        self.step_in_block += 1
        if self.step_in_block == self.params.steps_per_block or (
                self.ends_blocks_when_empty and not self.masked_positions().numel()):
            self.block += 1
            self.step_in_block = 0
        if self.block == self.params.num_blocks:
            self.status = SequenceStatus.FINISHED
            self.finish_reason = self.finish_reason or "length"

    def generated_token_ids(self) -> list[int]:
        return self.canvas[self.prompt_len:].tolist()
