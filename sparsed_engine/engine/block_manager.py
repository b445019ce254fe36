"""Allocation of the worker-side pattern pool: block ids per sequence, like vLLM's KV blocks.

Workers own the tensors; this side only hands out ids. A sequence reserves its blocks when it is
admitted (so a running request can never find the pool full at its selection step), turns the
reservation into ids when its pattern is selected, and frees them on finish or abort.
"""
from __future__ import annotations


class PoolFullError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_bytes: int):
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

    def reserve(self, seq_id: str, n: int) -> None:
        if n == 0:
            return
        if not self.can_reserve(n):
            raise PoolFullError(f"pattern pool cannot reserve {n} blocks for {seq_id!r}")
        self._reserved[seq_id] = n

    def allocate(self, seq_id: str) -> tuple[int, ...]:
        """Turn the reservation into block ids."""
        n = self._reserved.pop(seq_id, 0)
        ids = [self._free.pop() for _ in range(n)]
        self._owned[seq_id] = ids
        return tuple(ids)

    def free(self, seq_id: str) -> None:
        self._reserved.pop(seq_id, None)
        self._free.extend(reversed(self._owned.pop(seq_id, [])))

    def stats(self) -> dict:
        return {"total_blocks": self.num_blocks, "used_blocks": self.num_used,
                "reserved_blocks": self.num_reserved, "block_bytes": self.block_bytes,
                "used_bytes": self.num_used * self.block_bytes,
                "capacity_bytes": self.num_blocks * self.block_bytes}
