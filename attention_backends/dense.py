"""The dense backend: every row attends to all of its own tokens.

Throughput mode (attention_backends/kv_rows.py): refresh rows run as here and store their keys and
values; cached rows store their fresh ones, then attend to the whole row read from the KV pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import AttentionBackend, RowSpec
from attention_backends.kv_rows import KVWrites, PagedCall, check_kv_rows, packed_starts
from attention_backends.sdpa import dense_attention


@dataclass(frozen=True)
class RowBounds:
    starts: tuple[int, ...]      # the rows that run whole (exact mode and refreshes)
    lengths: tuple[int, ...]
    kv_writes: KVWrites | None = None   # throughput mode: the keys/values this step stores
    cached: PagedCall | None = None     # throughput mode: the cached rows, attended from the pool

    @classmethod
    def of(cls, rows: list[RowSpec], starts: list[int]) -> "RowBounds":
        whole = [i for i, r in enumerate(rows) if r.computed is None]
        return cls(tuple(starts[i] for i in whole), tuple(rows[i].length for i in whole))


class DenseBackend(AttentionBackend):
    name = "dense"
    supports_kv_cache = True

    def build_metadata(self, rows: list[RowSpec]) -> RowBounds:
        starts = packed_starts(rows)
        bounds = RowBounds.of(rows, starts)
        if not check_kv_rows(self, rows):
            return bounds
        cached = [i for i, r in enumerate(rows) if r.computed is not None]
        return RowBounds(bounds.starts, bounds.lengths, KVWrites.of(rows, starts, self.kv_page_size, self.device),
                         PagedCall.of(rows, starts, cached, self.device) if cached else None)

    def forward(self, q, k, v, metadata: RowBounds, layer: int) -> torch.Tensor:
        if metadata.kv_writes is not None:  # before any read: cached rows see their fresh keys
            metadata.kv_writes(self.k_cache[layer], self.v_cache[layer], k, v)
        out = torch.empty_like(q)
        for s, n in zip(metadata.starts, metadata.lengths):
            out[s:s + n] = dense_attention(q[s:s + n], k[s:s + n], v[s:s + n], self.layout.scale)
        if metadata.cached is not None:
            metadata.cached(q, self.k_cache[layer], self.v_cache[layer], self.layout.scale, out)
        return out
