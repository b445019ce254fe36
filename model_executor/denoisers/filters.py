"""Token filters shared by the families' samplers: temperature, top-p, top-k."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def filtered_logits(logits: torch.Tensor, top_p: float, top_k: int | None, temperature: float) -> torch.Tensor:
    """Dream's order: temperature, then top-p, then top-k."""
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:
        logits = _filter_top_p(logits, top_p)
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    return logits
