"""LLaDA's denoiser, after its reference `generate`: semi-autoregressive blocks, an even transfer
schedule per block, Gumbel-max in float64 for tokens, `low_confidence` or `random` remasking; and
Fast-dLLM v1's `confidence_threshold` (its `get_transfer_index` with a threshold): the confidence
of `low_confidence`, every position at or above the threshold committed, at least the most
confident one. A block ends when it has no mask left, within `steps_per_block` steps: its last
allotted step commits all that remain (with steps_per_block == block_length, the default, that
is exactly Fast-dLLM's loop, which runs a block until empty: one token a step at least)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model_executor.denoisers.base import Denoiser, threshold_pick
from model_executor.denoisers.filters import filtered_logits
from model_executor.step_input import RequestSampling


def llada_transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: an even split, the remainder to the first steps."""
    base, rem = divmod(num_masked, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


class LLaDADenoiser(Denoiser):
    name = "llada"
    policies = ("low_confidence", "random", "confidence_threshold")
    policy_key = "remasking"
    default_policy = "low_confidence"
    logits_shift = 0
    threshold_policies = ("confidence_threshold",)

    def check(self, params: Any, policy: str) -> None:
        if params.alg_temp:
            raise ValueError(f"SamplingParams.alg_temp={params.alg_temp!r} applies to Dream models only")

    def transfer(self, num_masked: int, step_in_block: int, params: Any) -> tuple[int, float]:
        # The reference splits the whole block (all of it masked at the block's start) evenly.
        base, rem = divmod(params.block_length, params.steps_per_block)
        return base + (step_in_block < rem), 0.0

    def unmask(self, logits: torch.Tensor, s: RequestSampling,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-max in float64 picks tokens; the k most confident (or k random) commit."""
        logits = filtered_logits(logits, s.top_p, s.top_k, temperature=0.0)  # a no-op by default
        if s.temperature > 0:
            noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen)
            noisy = logits.to(torch.float64).exp() / (-torch.log(noise)) ** s.temperature
        else:
            noisy = logits
        x0 = noisy.argmax(dim=-1)
        if s.policy == "random":
            conf = torch.rand(x0.shape, device=x0.device, generator=gen)
        else:  # low_confidence, confidence_threshold
            conf = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
        if s.policy in self.threshold_policies:
            idx = threshold_pick(conf, s.num_transfer, s.threshold)
        else:
            idx = torch.topk(conf, s.num_transfer).indices
        return idx, x0[idx]
