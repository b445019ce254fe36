"""SparseD: dense attention for the first steps, then per-head block-sparse attention over tiles
chosen once per request (at the last dense step) and read from the pattern pool ever after.

Throughput mode (attention_backends/kv_rows.py): refresh rows run their phase as in exact mode and
store their keys/values; cached rows store their fresh ones and attend from the KV pool, densely
before the selection, afterwards over the kept tiles of their own query blocks only."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from attention_backends.base import DENSE, SELECT, SPARSE, AttentionBackend, AttentionLayout, PoolSpec, RowSpec
from attention_backends.kv_rows import KVWrites, PagedCall, check_kv_rows, packed_starts
from attention_backends.sdpa import dense_attention, dense_attention_lse
from attention_backends.sparsed_pattern import (generation_block, pack_bits, select_tiles,
                                             select_tiles_by_mass, unpack_bits)
from attention_backends import sparse_ops

KERNELS = ("auto", "triton", "flex", "torch")


@dataclass(frozen=True)
class SparseDConfig:
    skip: float = 0.2              # fraction of steps that stay dense
    select: float = 0.3            # fraction of key blocks kept per query block and region
    block_size: int = 128          # tile edge (128 for long prompts, 32 for short ones)
    # "head_dim": 1/sqrt(head_dim); "num_heads": 1/sqrt(num_heads); None: the model family's
    # reference (AttentionLayout.selection_scale: LLaDA num_heads, Dream head_dim)
    selection_scale: str | None = None
    kernel: str = "auto"           # sparse-step kernel: auto (triton on CUDA, torch on CPU), triton, flex, torch
    # Adaptive selection (replaces `select` when `mass` is set): per layer, head, query block and
    # region, the fewest key blocks whose importance reaches `mass` of the row's total, kept
    # between int(n * min_select) + 1 and int(n * max_select) + 1 of the region's n key blocks.
    mass: float | None = None
    min_select: float | None = None   # default 0: at least one key block
    max_select: float | None = None   # default 1: up to every key block

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"attention_config[{name!r}]={getattr(self, name)!r}: {why}")
        if not 0 <= self.skip <= 1:
            bad("skip", "must be in [0, 1]")
        if not 0 < self.select <= 1:
            bad("select", "must be in (0, 1]")
        if (not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size > 128
                or self.block_size & (self.block_size - 1)):
            bad("block_size", "must be a power of two in [16, 128]")
        if self.selection_scale not in (None, "head_dim", "num_heads"):
            bad("selection_scale", "choose 'head_dim' or 'num_heads' (or leave unset: the family's reference)")
        if self.kernel not in KERNELS:
            bad("kernel", f"choose from {KERNELS}")
        if self.mass is None:
            for name in ("min_select", "max_select"):
                if getattr(self, name) is not None:
                    bad(name, "applies only to adaptive selection: set 'mass' too")
            return
        if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) or not 0 < self.mass <= 1:
            bad("mass", "must be a number in (0, 1]")
        for name in ("min_select", "max_select"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                bad(name, "must be a number in [0, 1]")
        if self.select_bounds[0] > self.select_bounds[1]:
            raise ValueError(f"attention_config['min_select']={self.min_select!r} exceeds "
                             f"attention_config['max_select']={self.max_select!r}")

    @property
    def select_bounds(self) -> tuple[float, float]:
        """(min_select, max_select) with their defaults filled in."""
        return (0.0 if self.min_select is None else self.min_select,
                1.0 if self.max_select is None else self.max_select)

    @property
    def keeps_all(self) -> bool:
        """Every tile is kept whatever the importance: exactly dense, no pattern needed."""
        return (self.select if self.mass is None else self.select_bounds[0]) >= 1

    def select_step(self, total_steps: int) -> int:
        """Steps before this one are dense; at it, still dense, the pattern is chosen."""
        return int(total_steps * self.skip) + 1


@dataclass
class _Row:
    start: int                  # offset in the packed batch
    length: int                 # canvas length
    phase: str
    config: SparseDConfig | None
    computed: tuple[int, int] | None = None   # a cached step's canvas span (RowSpec.computed)
    nb: int = 0
    gen_block: int = 0
    blocks: torch.Tensor | None = None  # [num_layers, blocks_per_layer] pool ids on the device


@dataclass
class _SparseGroup:
    """SPARSE rows sharing a block size and kernel: one kernel call per layer, its index
    tensors built once per step."""
    rows: list[_Row]
    block_size: int
    kernel: str
    cu_seqlens: torch.Tensor
    q_block_offsets: torch.Tensor
    span: tuple[int, int] | None     # the rows' token range when they lie back to back
    token_idx: torch.Tensor | None   # otherwise their token indices


@dataclass
class SparseDMetadata:
    rows: list[_Row]
    sparse_groups: list[_SparseGroup]   # SPARSE rows that run whole
    # Throughput mode: the keys/values this step stores, and the cached rows' pool reads (dense
    # ones together; SPARSE ones by block size and kernel, with their patterns' query blocks).
    kv_writes: KVWrites | None = None
    paged_calls: list[PagedCall] = field(default_factory=list)


class SparseDBackend(AttentionBackend):
    name = "sparsed"
    keeps_patterns = True
    supports_kv_cache = True

    # ---------------------------------------------------------------- planning
    @classmethod
    def resolve_config(cls, engine_config: dict | None, request_overrides: dict | None = None) -> SparseDConfig:
        merged = {**(engine_config or {}), **(request_overrides or {})}
        known = {f.name for f in fields(SparseDConfig)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown SparseD attention_config keys {unknown}; known: {sorted(known)}")
        return SparseDConfig(**merged)

    @classmethod
    def check_device(cls, config: SparseDConfig, device: str) -> None:
        # Triton kernels need CUDA tensors, unless the Triton interpreter runs them (tests on CPU)
        if (config.kernel == "triton" and torch.device(device).type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError(f"attention_config['kernel']='triton' needs a CUDA device, not {device!r}; "
                             f"use 'auto' or 'torch'")

    @classmethod
    def phase(cls, step: int, total_steps: int, config: SparseDConfig) -> str:
        at = config.select_step(total_steps)
        return DENSE if step < at else SELECT if step == at else SPARSE

    @staticmethod
    def _layer_bytes(layout: AttentionLayout, seq_len: int, block_size: int) -> int:
        nb = -(-seq_len // block_size)
        return layout.num_heads * nb * (-(-nb // 8))

    @classmethod
    def pattern_blocks_needed(cls, layout, seq_len, config: SparseDConfig, block_bytes, total_steps) -> int:
        if config.keeps_all or config.select_step(total_steps) >= total_steps:
            return 0  # every tile kept, or no sparse step ever: plain dense, no pattern
        per_layer = -(-cls._layer_bytes(layout, seq_len, config.block_size) // block_bytes)
        return layout.num_layers * per_layer

    # ---------------------------------------------------------------- pool
    def init_pool(self, spec: PoolSpec) -> None:
        self.block_bytes = spec.block_bytes
        self.pool = torch.zeros(spec.num_blocks, spec.block_bytes, dtype=torch.uint8, device=self.device)

    def pool_usage(self) -> dict:
        return {"allocated_bytes": self.pool.numel()}

    def _store(self, row: _Row, layer: int, keep: torch.Tensor) -> None:
        bits = pack_bits(keep).flatten()
        ids = row.blocks[layer]
        buf = torch.zeros(ids.numel() * self.block_bytes, dtype=torch.uint8, device=self.device)
        buf[:bits.numel()] = bits
        self.pool[ids] = buf.view(ids.numel(), self.block_bytes)

    def load_bits(self, row: _Row, layer: int) -> torch.Tensor:
        """The stored pattern of one row and layer, packed: uint8 [H, nb, ceil(nb / 8)]."""
        h, nb = self.layout.num_heads, row.nb
        nbytes = h * nb * (-(-nb // 8))
        return self.pool[row.blocks[layer]].flatten()[:nbytes].view(h, nb, -1)

    def load_tiles(self, row: _Row, layer: int) -> torch.Tensor:
        """The stored pattern of one row and layer: bool [H, nb, nb]."""
        return unpack_bits(self.load_bits(row, layer), row.nb)

    # ---------------------------------------------------------------- per step
    def build_metadata(self, rows: list[RowSpec]) -> SparseDMetadata:
        uses_kv = check_kv_rows(self, rows)
        starts = packed_starts(rows)
        out, groups = [], {}
        for i, (spec, start) in enumerate(zip(rows, starts)):
            if spec.computed is not None and spec.phase == SELECT:
                raise ValueError(f"row {i}: phase {SELECT!r} on a cached step (computed={spec.computed}): "
                                 f"the pattern is selected only on a refresh step, over the whole canvas")
            row = _Row(start, spec.length, spec.phase, spec.config, spec.computed)
            if spec.phase != DENSE:
                bs = spec.config.block_size
                row.nb = -(-spec.length // bs)
                row.gen_block = generation_block(spec.prompt_len, spec.length, bs)
                row.blocks = torch.tensor(spec.pattern_blocks, dtype=torch.long).view(
                    self.layout.num_layers, -1).to(self.device)
                if spec.phase == SPARSE and spec.computed is None:
                    groups.setdefault((bs, spec.config.kernel), []).append(i)
            out.append(row)
        meta = SparseDMetadata(out, [self._group([out[i] for i in members], *key)
                                     for key, members in groups.items()])
        if uses_kv:
            self._plan_cache(rows, starts, meta)
        return meta

    def _plan_cache(self, rows: list[RowSpec], starts: list[int], meta: SparseDMetadata) -> None:
        meta.kv_writes = KVWrites.of(rows, starts, self.kv_page_size, self.device)
        dense, sparse = [], {}
        for i, spec in enumerate(rows):
            if spec.computed is None:
                continue
            if spec.phase == DENSE:
                dense.append(i)
            else:
                sparse.setdefault((spec.config.block_size, spec.config.kernel), []).append(i)
        if dense:
            meta.paged_calls.append(PagedCall.of(rows, starts, dense, self.device))
        for (bs, kernel), members in sparse.items():
            meta.paged_calls.append(PagedCall.of(rows, starts, members, self.device, kernel, bs))

    def _group(self, rows: list[_Row], bs: int, kernel: str) -> _SparseGroup:
        def offsets(sizes):
            return torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)

        back_to_back = all(a.start + a.length == b.start for a, b in zip(rows, rows[1:]))
        span = (rows[0].start, rows[-1].start + rows[-1].length) if back_to_back else None
        token_idx = None if back_to_back else torch.cat(
            [torch.arange(r.start, r.start + r.length) for r in rows]).to(self.device)
        return _SparseGroup(rows, bs, kernel, offsets([r.length for r in rows]), offsets([r.nb for r in rows]),
                            span, token_idx)

    def forward(self, q, k, v, metadata: SparseDMetadata, layer: int) -> torch.Tensor:
        if metadata.kv_writes is not None:  # before any read: cached rows see their fresh keys
            metadata.kv_writes(self.k_cache[layer], self.v_cache[layer], k, v)
        out = torch.empty_like(q)
        for row in metadata.rows:
            if row.phase == SPARSE or row.computed is not None:
                continue
            s, e = row.start, row.start + row.length
            if row.phase == DENSE:
                out[s:e] = dense_attention(q[s:e], k[s:e], v[s:e], self.layout.scale)
                continue
            # The selection step's dense pass also yields the row log-sum-exp that importance
            # needs, when it selects at the model's own scale.
            reuse = self.selection_scale(row.config) == "head_dim"
            if reuse:
                out[s:e], lse = dense_attention_lse(q[s:e], k[s:e], v[s:e], self.layout.scale)
            else:
                out[s:e], lse = dense_attention(q[s:e], k[s:e], v[s:e], self.layout.scale), None
            self._store(row, layer, self._choose(q[s:e], k[s:e], row, lse))
        for group in metadata.sparse_groups:
            self._sparse(q, k, v, group, layer, out)
        for call in metadata.paged_calls:
            self._paged(q, call, metadata.rows, layer, out)
        return out

    def selection_scale(self, cfg: SparseDConfig) -> str:
        return cfg.selection_scale or self.layout.selection_scale

    def _choose(self, q, k, row: _Row, lse: torch.Tensor | None = None) -> torch.Tensor:
        cfg = row.config
        scale = (self.layout.scale if self.selection_scale(cfg) == "head_dim"
                 else 1.0 / math.sqrt(self.layout.total_heads))
        imp_all, imp_gen = sparse_ops.importance(q, k, scale, cfg.block_size, row.gen_block, cfg.kernel, lse)
        if cfg.mass is None:
            return select_tiles(imp_all, imp_gen, row.gen_block, cfg.select)
        return select_tiles_by_mass(imp_all, imp_gen, row.gen_block, cfg.mass, *cfg.select_bounds)

    def _sparse(self, q, k, v, g: _SparseGroup, layer: int, out: torch.Tensor) -> None:
        """One call over exactly the kept tiles of a group's rows."""
        width = max(r.nb for r in g.rows)  # room for any pattern: no count, so no wait for the GPU
        lists = [sparse_ops.pattern_lists(self.load_bits(r, layer), r.nb, width, g.kernel) for r in g.rows]
        kv_num = torch.cat([n for n, _ in lists], dim=1)
        kv_idx = torch.cat([i for _, i in lists], dim=1)
        if g.span is not None:  # the usual case: a slice, no gather or scatter
            s, e = g.span
            out[s:e] = sparse_ops.block_sparse(q[s:e], k[s:e], v[s:e], g.cu_seqlens, g.q_block_offsets,
                                               kv_num, kv_idx, g.block_size, self.layout.scale, g.kernel)
        else:
            i = g.token_idx
            out[i] = sparse_ops.block_sparse(q[i], k[i], v[i], g.cu_seqlens, g.q_block_offsets,
                                             kv_num, kv_idx, g.block_size, self.layout.scale, g.kernel)

    def _paged(self, q, call: PagedCall, rows: list[_Row], layer: int, out: torch.Tensor) -> None:
        """Cached rows from the KV pool: every key, or (SPARSE) the stored pattern's rows of just
        the query blocks their fresh tokens fall in."""
        kv_num = kv_idx = None
        if call.block_size is not None:
            members = [rows[i] for i in call.rows]
            width = max(r.nb for r in members)
            lists = [sparse_ops.pattern_lists(self.load_bits(r, layer)[:, b0:b1], r.nb, width, call.kernel)
                     for r, (b0, b1) in zip(members, call.q_blocks)]
            kv_num, kv_idx = lists[0] if len(lists) == 1 else (torch.cat([n for n, _ in lists], dim=1),
                                                               torch.cat([i for _, i in lists], dim=1))
        call(q, self.k_cache[layer], self.v_cache[layer], self.layout.scale, out, kv_num, kv_idx)
