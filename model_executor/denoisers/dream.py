"""Dream's denoiser, after its reference `diffusion_generate`: logits shifted by one position (the
model was adapted from an autoregressive one), a timestep schedule from 1 down to `eps`, and the
`origin`, `maskgit_plus`, `topk_margin` and `entropy` algorithms; and Fast-dLLM v1's
`confidence_threshold` (its threshold decoding for Dream): the confidence of `maskgit_plus` (the
sampled token's probability), every masked position of the block at or above the threshold
committed, at least the most confident one. A block ends when it has no mask left, within
`steps_per_block` steps: its last allotted step commits all that remain (with steps_per_block ==
block_length, the default, that is exactly Fast-dLLM's loop, which runs a block until empty)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model_executor.denoisers.base import Denoiser, threshold_pick
from model_executor.denoisers.filters import filtered_logits
from model_executor.step_input import RequestSampling


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    # float32 on purpose: Dream's counts below are float32 products, as in its reference.
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32)


def dream_transfer_count(num_masked: int, i: int, steps: int, eps: float) -> int:
    if i == steps - 1:
        return num_masked
    ts = dream_timesteps(steps, eps)
    return int(torch.tensor(float(num_masked)) * (1 - ts[i + 1] / ts[i]))


def dream_transfer_prob(i: int, steps: int, eps: float) -> float:
    """`origin`: each masked position is committed with probability 1 - s/t (1 at the last step)."""
    if i == steps - 1:
        return 1.0
    ts = dream_timesteps(steps, eps)
    return float(1 - ts[i + 1] / ts[i])


def dream_sample(logits: torch.Tensor, s: RequestSampling,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's `sample_tokens`: (confidence, token) per position."""
    probs = torch.softmax(filtered_logits(logits, s.top_p, s.top_k, s.temperature), dim=-1)
    if s.temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if s.policy == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif s.policy == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


class DreamDenoiser(Denoiser):
    name = "dream"
    policies = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")
    policy_key = "alg"
    default_policy = "origin"
    logits_shift = 1
    threshold_policies = ("confidence_threshold",)

    def check(self, params: Any, policy: str) -> None:
        if policy in self.threshold_policies and params.alg_temp:
            raise ValueError(f"SamplingParams.alg_temp={params.alg_temp!r} does not apply to {policy!r} "
                             f"(it commits by threshold, not by sampling positions)")

    def transfer(self, num_masked: int, step_in_block: int, params: Any) -> tuple[int, float]:
        steps, eps = params.steps_per_block, params.eps
        return (dream_transfer_count(num_masked, step_in_block, steps, eps),
                dream_transfer_prob(step_in_block, steps, eps))

    def unmask(self, logits: torch.Tensor, s: RequestSampling,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if s.policy == "origin":
            chosen = torch.rand(logits.shape[0], device=logits.device, generator=gen) < s.transfer_prob
            idx = chosen.nonzero().squeeze(-1)
            _, x0 = dream_sample(logits[idx], s, gen)
            return idx, x0
        conf, x0 = dream_sample(logits, s, gen)
        if s.policy in self.threshold_policies:
            idx = threshold_pick(conf, s.num_transfer, s.threshold)
            return idx, x0[idx]
        n = s.num_transfer
        if n <= 0:
            return torch.zeros(0, dtype=torch.long, device=logits.device), x0[:0]
        if s.alg_temp:
            weights = F.softmax(conf / s.alg_temp, dim=-1)
            idx = torch.multinomial(weights, n, generator=gen)
        else:
            idx = torch.topk(conf, n).indices
        return idx, x0[idx]
