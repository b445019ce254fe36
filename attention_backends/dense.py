"""The dense backend: every row attends to all of its own tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend, RowSpec
from attention_backends.sdpa import dense_attention


@dataclass(frozen=True)
class RowBounds:
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, rows: list[RowSpec]) -> "RowBounds":
        starts, pos = [], 0
        for r in rows:
            starts.append(pos)
            pos += r.length
        return cls(tuple(starts), tuple(r.length for r in rows))


class DenseBackend(AttentionBackend):
    name = "dense"

    def build_metadata(self, rows: list[RowSpec]) -> RowBounds:
        return RowBounds.of(rows)

    def forward(self, q, k, v, metadata: RowBounds, layer: int) -> torch.Tensor:
        out = torch.empty_like(q)
        for s, n in zip(metadata.starts, metadata.lengths):
            out[s:s + n] = dense_attention(q[s:s + n], k[s:s + n], v[s:s + n], self.layout.scale)
        return out
