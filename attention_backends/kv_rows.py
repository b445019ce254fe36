"""Throughput-mode bookkeeping the dense and SparseD backends share, built once per step.

A row with KV pages is either a refresh (computed=None: it runs whole, as in exact mode, and its
keys/values of every canvas position are stored) or a cached step (computed=(s, e): only canvas
positions s..e-1 are in the packed batch; their keys/values are stored first, then their queries
attend to the row's whole canvas read back from the pool with `sparse_ops.paged_attention`).
Rows without pages never reach this module: exact mode keeps its own code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from attention_backends import sparse_ops
from attention_backends.base import RowSpec


def packed_starts(rows: list[RowSpec]) -> list[int]:
    """Offset of each row in the step's packed batch (rows hold `num_tokens` tokens each)."""
    starts, pos = [], 0
    for r in rows:
        starts.append(pos)
        pos += r.num_tokens
    return starts


def check_kv_rows(backend, rows: list[RowSpec]) -> bool:
    """True when some row uses the KV pool; ValueError naming the row and value when a row's
    cache plan cannot run (checked on the host before any work)."""
    used = False
    for i, r in enumerate(rows):
        if r.computed is not None:
            s, e = r.computed
            if not r.kv_pages:
                raise ValueError(f"row {i}: RowSpec.computed={r.computed} needs kv_pages (a cached step "
                                 f"reads the refresh's keys from the pool)")
            if not 0 <= s < e <= r.length:
                raise ValueError(f"row {i}: RowSpec.computed={r.computed} is not a span inside the "
                                 f"row's {r.length} canvas positions")
        if not r.kv_pages:
            continue
        used = True
        k_cache = getattr(backend, "k_cache", None)
        if k_cache is None:
            raise ValueError(f"row {i} has kv_pages but the backend's KV pool was never allocated "
                             f"(call init_kv_pool first)")
        num_pages, page_size = k_cache.shape[1], k_cache.shape[2]
        if len(r.kv_pages) * page_size < r.length:
            raise ValueError(f"row {i}: {len(r.kv_pages)} kv_pages of {page_size} tokens cannot hold "
                             f"its {r.length} canvas positions")
        if min(r.kv_pages) < 0 or max(r.kv_pages) >= num_pages:
            raise ValueError(f"row {i}: kv_pages {r.kv_pages} outside the pool's {num_pages} pages")
    return used


def _slots(r: RowSpec, page_size: int) -> torch.Tensor:
    s, e = r.computed or (0, r.length)
    pos = torch.arange(s, e)
    return torch.tensor(r.kv_pages, dtype=torch.long)[pos // page_size] * page_size + pos % page_size


def _token_index(starts: list[int], sizes: list[int], device) -> tuple[tuple[int, int] | None,
                                                                      torch.Tensor | None]:
    """(span, None) when the tokens lie back to back in the packed batch, else (None, indices)."""
    if all(a + n == b for a, n, b in zip(starts, sizes, starts[1:])):
        return (starts[0], starts[-1] + sizes[-1]), None
    return None, torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)]).to(device)


@dataclass
class KVWrites:
    """Every key/value a step stores: the tokens of all rows with pages, one write per layer."""
    slots: torch.Tensor                 # flat pool slots (page * page_size + offset), on the device
    span: tuple[int, int] | None        # those tokens' range in the packed batch when contiguous
    token_idx: torch.Tensor | None      # otherwise their indices

    @classmethod
    def of(cls, rows: list[RowSpec], starts: list[int], page_size: int, device) -> "KVWrites":
        members = [i for i, r in enumerate(rows) if r.kv_pages]
        span, idx = _token_index([starts[i] for i in members], [rows[i].num_tokens for i in members],
                                 device)
        slots = torch.cat([_slots(rows[i], page_size) for i in members]).to(device)
        return cls(slots, span, idx)

    def __call__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kernel: str = "auto") -> None:
        """Store this step's fresh keys/values of one layer (k_cache = backend.k_cache[layer])."""
        if self.span is not None:
            k, v = k[self.span[0]:self.span[1]], v[self.span[0]:self.span[1]]
        else:
            k, v = k[self.token_idx], v[self.token_idx]
        sparse_ops.write_kv(k_cache, v_cache, k, v, self.slots, kernel)


@dataclass
class PagedCall:
    """Cached rows attended in one `paged_attention` call per layer; index tensors built once."""
    rows: list[int]                     # indices into the step's rows, in call order
    span: tuple[int, int] | None        # their query tokens' range in the packed batch when contiguous
    token_idx: torch.Tensor | None      # otherwise their indices
    page_table: torch.Tensor            # int32 [R, max_pages], device
    # Host tensors (the kernel plans its work from their values on the CPU, once per step: every
    # layer passes the same values):
    cu_q: torch.Tensor                  # int32 [R+1]: the rows' fresh queries in the call's q
    q_start: torch.Tensor               # int32 [R]: first computed canvas position of each row
    kv_len: torch.Tensor                # int32 [R]: canvas length of each row
    kernel: str = "auto"
    block_size: int | None = None       # with a block pattern (SparseD after its selection):
    q_blocks: list[tuple[int, int]] | None = None   # each row's query blocks [b0, b1) of its pattern
    q_block_offsets: torch.Tensor | None = None     # int32 [R+1], device

    @classmethod
    def of(cls, rows: list[RowSpec], starts: list[int], members: list[int], device, kernel: str = "auto",
           block_size: int | None = None) -> "PagedCall":
        def int32(values, to_device=True):
            t = torch.tensor(values, dtype=torch.int32)
            return t.to(device) if to_device else t

        specs = [rows[i] for i in members]
        sizes = [r.num_tokens for r in specs]
        span, idx = _token_index([starts[i] for i in members], sizes, device)
        width = max(len(r.kv_pages) for r in specs)
        table = int32([list(r.kv_pages) + [0] * (width - len(r.kv_pages)) for r in specs])
        cu_q = int32([0, *accumulate(sizes)], to_device=False)
        q_start = int32([r.computed[0] for r in specs], to_device=False)
        kv_len = int32([r.length for r in specs], to_device=False)
        call = cls(members, span, idx, table, cu_q, q_start, kv_len, kernel)
        if block_size is not None:
            call.block_size = block_size
            call.q_blocks = [(r.computed[0] // block_size, (r.computed[1] - 1) // block_size + 1) for r in specs]
            call.q_block_offsets = int32([0, *accumulate(b1 - b0 for b0, b1 in call.q_blocks)])
        return call

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                 out: torch.Tensor, kv_num: torch.Tensor | None = None, kv_idx: torch.Tensor | None = None) -> None:
        """Attend this call's rows for one layer into `out` (kv_num/kv_idx: the rows' query-block
        pattern lists, concatenated in q_blocks order, when block_size is set)."""
        sel = slice(*self.span) if self.span is not None else self.token_idx
        out[sel] = sparse_ops.paged_attention(
            q[sel], k_cache, v_cache, self.page_table, self.cu_q, self.q_start, self.kv_len, scale,
            self.block_size, self.q_block_offsets, kv_num, kv_idx, self.kernel)
