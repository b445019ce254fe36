"""A request's canvas and where it stands in its denoising schedule."""
from __future__ import annotations

import enum
import os
import time

import torch

from attention_backends.base import SELECT
from sparsed_engine.engine import unmasking
from sparsed_engine.outputs import RequestMetrics
from sparsed_engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt tokens followed by `max_tokens` mask tokens, decoded block by block.

    `step` counts denoising steps over the whole request (across blocks), as SparseD counts them.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, family: str, policy: str, mask_token_id: int,
                 attention_config, pattern_blocks: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.family = family
        self.policy = policy
        self.mask_token_id = mask_token_id
        self.attention_config = attention_config
        self.pattern_blocks_needed = pattern_blocks   # 0: this request never needs a pattern
        self.pattern_blocks: tuple[int, ...] = ()
        self.prompt_len = len(prompt_token_ids)
        self.canvas = torch.tensor(prompt_token_ids + [mask_token_id] * params.max_tokens,
                                   dtype=torch.long)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.step = 0
        self.block = 0
        self.step_in_block = 0
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self._generators: dict[torch.device, torch.Generator] = {}
        self._schedule = self._block_schedule()
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

    def rows(self) -> list[torch.Tensor]:
        if self.num_rows == 1:
            return [self.canvas]
        uncond = self.canvas.clone()
        uncond[:self.prompt_len] = self.mask_token_id
        return [self.canvas, uncond]

    # ---------------------------------------------------------------- schedule
    def _block_schedule(self) -> list[int] | None:
        if self.family != "llada":
            return None  # Dream recounts the masked tokens at every step
        return unmasking.llada_transfer_schedule(self.params.block_length, self.params.steps_per_block)

    def transfer_plan(self, num_masked: int) -> tuple[int, float]:
        """(tokens to commit, origin's per-position probability) at the current step."""
        spb, i = self.params.steps_per_block, self.step_in_block
        if self._schedule is not None:
            return self._schedule[i], 0.0
        return (unmasking.dream_transfer_count(num_masked, i, spb, self.params.eps),
                unmasking.dream_transfer_prob(i, spb, self.params.eps))

    def needs_forward(self, phase: str, num_masked: int) -> bool:
        """A step that commits nothing and selects no pattern changes nothing: skip its forward."""
        if phase == SELECT:
            return True
        n, p = self.transfer_plan(num_masked)
        return n > 0 or p > 0

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # ---------------------------------------------------------------- progress
    def commit(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        self.canvas[positions.cpu()] = tokens.cpu()

    def advance(self) -> None:
        self.step += 1
        self.step_in_block += 1
        if self.step_in_block == self.params.steps_per_block:
            self.block += 1
            self.step_in_block = 0
            self._schedule = self._block_schedule()
        if self.block == self.params.num_blocks:
            self.status = SequenceStatus.FINISHED
            self.finish_reason = self.finish_reason or "length"

    def generated_token_ids(self) -> list[int]:
        return self.canvas[self.prompt_len:].tolist()
