"""How one sequence-parallel rank sees the model: its token shard and its attention heads."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from attention_backends.base import AttentionLayout


def kv_repeats(num_kv_heads: int, sp: int) -> int:
    """Copies of each KV head so that the KV heads split evenly over `sp` ranks.

    1 when sp divides the KV heads; otherwise each head is repeated up to lcm(heads, sp) in all,
    which keeps every rank's query heads with their own KV head (Dream: 4 KV heads, sp=8).
    """
    return sp // math.gcd(num_kv_heads, sp)


def rank_layout(layout: AttentionLayout, sp: int) -> AttentionLayout:
    """The attention shape one rank holds: num_heads/sp query heads and their KV heads;
    total_heads stays the model's (SparseD's selection_scale="num_heads" reads it)."""
    if layout.num_heads % sp:
        raise ValueError(f"sequence_parallel_size={sp} must divide the model's "
                         f"{layout.num_heads} attention heads")
    kv = layout.num_kv_heads * kv_repeats(layout.num_kv_heads, sp) // sp
    return replace(layout, num_heads=layout.num_heads // sp, num_kv_heads=kv)


@dataclass(frozen=True)
class TokenShard:
    """Rank `rank`'s contiguous slice of a packed batch of `num_tokens` tokens, padded so every
    rank holds `per_rank` rows (the padding rows compute garbage that nothing reads)."""
    num_tokens: int
    size: int
    rank: int

    @property
    def per_rank(self) -> int:
        return -(-self.num_tokens // self.size)

    @property
    def start(self) -> int:
        return self.rank * self.per_rank

    def take(self, x: torch.Tensor) -> torch.Tensor:
        part = x[self.start:self.start + self.per_rank]
        pad = self.per_rank - part.shape[0]
        return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part
