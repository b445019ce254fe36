"""Allocation of the worker-side pools, like vLLM's KV blocks: ids per sequence, never tensors.

Two pools of fixed-size pages, one allocator class: the sparse-pattern pool (a sequence reserves its
blocks at admission, so a running request never finds the pool full at its selection step, and
turns the reservation into ids when its pattern is selected) and the paged KV pool of throughput
mode (pages reserved and allocated at admission, used from the first step: one page table per
canvas row). Both are freed on finish or abort.
"""
from __future__ import annotations


class PoolFullError(RuntimeError):
    pass


class PagePool:
    """A fixed pool of `num_blocks` equal blocks of `block_bytes`: reserve, allocate, free by owner."""

    def __init__(self, name: str, num_blocks: int, block_bytes: int):
        self.name = name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owned: dict[str, list[int]] = {}
        self._reserved: dict[str, int] = {}

    @property
    def num_reserved(self) -> int:
        return sum(self._reserved.values())

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_ever_fit(self, n: int) -> bool:
        return n <= self.num_blocks

    def can_reserve(self, n: int) -> bool:
        return n <= len(self._free) - self.num_reserved

    def reserve(self, owner: str, n: int) -> None:
        if n == 0:
            return
        if not self.can_reserve(n):
            raise PoolFullError(f"{self.name} cannot reserve {n} blocks for {owner!r}")
        self._reserved[owner] = n

    def allocate(self, owner: str) -> tuple[int, ...]:
        """Turn the reservation into block ids."""
        n = self._reserved.pop(owner, 0)
        ids = [self._free.pop() for _ in range(n)]
        self._owned[owner] = ids
        return tuple(ids)

    def free(self, owner: str) -> None:
        self._reserved.pop(owner, None)
        self._free.extend(reversed(self._owned.pop(owner, [])))

    def stats(self) -> dict:
        return {"total_blocks": self.num_blocks, "used_blocks": self.num_used,
                "reserved_blocks": self.num_reserved, "block_bytes": self.block_bytes,
                "used_bytes": self.num_used * self.block_bytes,
                "capacity_bytes": self.num_blocks * self.block_bytes}


class BlockManager:
    """The pattern pool (its API is this class's own: reserve / allocate / free / stats) and the
    KV pool (`kv`, pages of `kv_page_size` tokens; `kv_enabled` False: the engine allocated none)."""

    def __init__(self, num_blocks: int, block_bytes: int, kv_pages: int = 0, kv_page_bytes: int = 0,
                 kv_page_size: int = 64, kv_enabled: bool = False):
        self.patterns = PagePool("pattern pool", num_blocks, block_bytes)
        self.kv = PagePool("KV pool", kv_pages, kv_page_bytes)
        self.kv_page_size = kv_page_size
        self.kv_enabled = kv_enabled

    # ---------------------------------------------------------------- the pattern pool
    @property
    def num_blocks(self) -> int:
        return self.patterns.num_blocks

    @property
    def block_bytes(self) -> int:
        return self.patterns.block_bytes

    def can_ever_fit(self, n: int) -> bool:
        return self.patterns.can_ever_fit(n)

    def can_reserve(self, n: int) -> bool:
        return self.patterns.can_reserve(n)

    def reserve(self, seq_id: str, n: int) -> None:
        self.patterns.reserve(seq_id, n)

    def allocate(self, seq_id: str) -> tuple[int, ...]:
        return self.patterns.allocate(seq_id)

    def stats(self) -> dict:
        return self.patterns.stats()

    # ---------------------------------------------------------------- the KV pool
    def kv_pages_per_row(self, canvas_len: int) -> int:
        return -(-canvas_len // self.kv_page_size)

    def kv_stats(self) -> dict:
        return {**self.kv.stats(), "page_size": self.kv_page_size}

    # ---------------------------------------------------------------- a sequence's whole life
    def can_admit(self, pattern_blocks: int, kv_pages: int) -> bool:
        return self.patterns.can_reserve(pattern_blocks) and self.kv.can_reserve(kv_pages)

    def admit(self, seq_id: str, pattern_blocks: int, kv_pages: int, rows: int) -> tuple[tuple[int, ...], ...]:
        """Reserve the pattern, allocate the KV pages now; returns each row's page table (() without a cache)."""
        self.patterns.reserve(seq_id, pattern_blocks)
        if not kv_pages:
            return ((),) * rows
        self.kv.reserve(seq_id, kv_pages)
        pages = self.kv.allocate(seq_id)
        per_row = kv_pages // rows
        return tuple(pages[r * per_row:(r + 1) * per_row] for r in range(rows))

    def free(self, seq_id: str) -> None:
        """Everything the sequence holds in both pools (finish or abort)."""
        self.patterns.free(seq_id)
        self.kv.free(seq_id)
