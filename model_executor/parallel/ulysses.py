"""The backend a model receives under sequence parallelism (DeepSpeed-Ulysses).

The model runs on a token shard and calls `forward(q, k, v)` with [T/sp, H, D] tensors as usual.
This wrapper turns them into all tokens of H/sp heads, lets the real backend (built with the
rank's AttentionLayout) attend, and turns the result back, so the models never know. SparseD
selects and applies the pattern of the rank's own heads, stored in the rank's own pool.
In throughput mode the inner backend likewise stores and reads the KV of the rank's own heads in
its own KV pool: after the all-to-all it sees whole rows (or a cached row's whole computed span).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attention_backends.base import AttentionBackend, KVPoolSpec, PoolSpec, RowSpec
from model_executor.parallel.group import SequenceParallelGroup
from model_executor.parallel.layout import kv_repeats


@dataclass
class UlyssesMetadata:
    inner: Any          # the wrapped backend's metadata for the whole packed batch
    num_tokens: int     # real tokens of the packed batch (the shards are padded; cached rows count their span)


class UlyssesBackend(AttentionBackend):
    def __init__(self, inner: AttentionBackend, group: SequenceParallelGroup):
        super().__init__(inner.layout, inner.device, inner.dtype)
        self.inner, self.group = inner, group
        self.supports_kv_cache = inner.supports_kv_cache

    def build_metadata(self, rows: list[RowSpec]) -> UlyssesMetadata:
        return UlyssesMetadata(self.inner.build_metadata(rows), sum(r.num_tokens for r in rows))

    def forward(self, q, k, v, metadata: UlyssesMetadata, layer: int) -> torch.Tensor:
        g, n = self.group, metadata.num_tokens
        repeats = kv_repeats(k.shape[1], g.size)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = self.inner.forward(g.to_heads(q, n), g.to_heads(k, n), g.to_heads(v, n), metadata.inner, layer)
        return g.to_tokens(out)

    def init_pool(self, spec: PoolSpec) -> None:
        self.inner.init_pool(spec)

    def pool_usage(self) -> dict:
        return self.inner.pool_usage()

    def init_kv_pool(self, spec: KVPoolSpec) -> None:
        self.inner.init_kv_pool(spec)   # each rank caches its own heads (after the all-to-all)

    def kv_pool_usage(self) -> dict:
        return self.inner.kv_pool_usage()
