"""Unmasking policies: which masked positions a step commits, and with which tokens.

Each policy sees only the logits of the positions it may commit (the still-masked positions of the
current block, in canvas order) and returns indices into that list plus the chosen tokens.
LLaDA's policies follow its reference `generate`; Dream's follow `diffusion_generate`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsed_engine.sampling_params import SamplingParams

# ---------------------------------------------------------------- transfer schedules


def llada_transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: an even split, the remainder to the first steps."""
    base, rem = divmod(num_masked, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


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


# ---------------------------------------------------------------- token sampling


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def filtered_logits(logits: torch.Tensor, p: SamplingParams, temperature: float) -> torch.Tensor:
    """Dream's order: temperature, then top-p, then top-k."""
    if temperature > 0:
        logits = logits / temperature
    if p.top_p < 1:
        logits = _filter_top_p(logits, p.top_p)
    if p.top_k is not None:
        logits = _filter_top_k(logits, p.top_k)
    return logits


def dream_sample(logits: torch.Tensor, p: SamplingParams, policy: str,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's `sample_tokens`: (confidence, token) per position."""
    probs = torch.softmax(filtered_logits(logits, p, p.temperature), dim=-1)
    if p.temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if policy == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif policy == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


# ---------------------------------------------------------------- policies


def llada_unmask(logits: torch.Tensor, k: int, p: SamplingParams, policy: str,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA: Gumbel-max in float64 picks tokens; the k most confident (or k random) commit."""
    logits = filtered_logits(logits, p, temperature=0.0)  # top-p/top-k only; a no-op by default
    if p.temperature > 0:
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen)
        noisy = logits.to(torch.float64).exp() / (-torch.log(noise)) ** p.temperature
    else:
        noisy = logits
    x0 = noisy.argmax(dim=-1)
    if policy == "low_confidence":
        conf = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    else:  # random
        conf = torch.rand(x0.shape, device=x0.device, generator=gen)
    idx = torch.topk(conf, k).indices
    return idx, x0[idx]


def dream_unmask(logits: torch.Tensor, n: int, p_transfer: float, p: SamplingParams, policy: str,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if policy == "origin":
        chosen = torch.rand(logits.shape[0], device=logits.device, generator=gen) < p_transfer
        idx = chosen.nonzero().squeeze(-1)
        _, x0 = dream_sample(logits[idx], p, policy, gen)
        return idx, x0
    conf, x0 = dream_sample(logits, p, policy, gen)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device), x0[:0]
    if p.alg_temp:
        weights = F.softmax(conf / p.alg_temp, dim=-1)
        idx = torch.multinomial(weights, n, generator=gen)
    else:
        idx = torch.topk(conf, n).indices
    return idx, x0[idx]
