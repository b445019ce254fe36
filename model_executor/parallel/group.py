"""The collectives of sequence parallelism over one torch.distributed group (NCCL or gloo)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model_executor.parallel.layout import TokenShard


@dataclass(frozen=True)
class DistributedInit:
    """Where rank `rank` meets its peers: a torch.distributed init method, e.g. tcp://host:port."""
    rank: int
    init_method: str


class SequenceParallelGroup:
    def __init__(self, size: int, init: DistributedInit, device: torch.device):
        self.size, self.rank, self.device = size, init.rank, device
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init.init_method, rank=init.rank,
                                world_size=size, device_id=device if cuda else None)

    def shard(self, num_tokens: int) -> TokenShard:
        return TokenShard(num_tokens, self.size, self.rank)

    def to_heads(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """All-to-all: this rank's tokens of all heads [T/sp, H, D] -> all tokens of its heads
        [T, H/sp, D] (the padding rows of the last shard dropped)."""
        t, h, d = x.shape
        send = x.view(t, self.size, h // self.size, d).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.view(self.size * t, h // self.size, d)[:num_tokens]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse all-to-all: [T, H/sp, D] -> this rank's tokens of all heads [T/sp, H, D]."""
        n, hs, d = x.shape
        t = -(-n // self.size)
        send = torch.cat([x, x.new_zeros(self.size * t - n, hs, d)]) if n % self.size else x.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.view(self.size, t, hs, d).transpose(0, 1).reshape(t, self.size * hs, d)

    def gather_rows(self, local: torch.Tensor, rows: torch.Tensor, shard: TokenShard) -> torch.Tensor | None:
        """Rows `rows` (CPU indices into the whole packed batch) of a token-sharded tensor, in
        that order, on rank 0; None on the other ranks. Only those rows travel."""
        owner = rows // shard.per_rank
        counts = torch.bincount(owner, minlength=self.size).tolist()
        width = max(counts)
        if width == 0:  # every rank knows the rows, so all skip the collective together
            return local.new_empty(0, *local.shape[1:]) if self.rank == 0 else None
        mine = (rows[owner == self.rank] - shard.start).to(self.device)
        send = local.new_zeros(width, *local.shape[1:])
        send[:mine.numel()] = local[mine]
        recv = [torch.empty_like(send) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(send, recv, dst=0)
        if self.rank != 0:
            return None
        out = local.new_empty(rows.numel(), *local.shape[1:])
        for r in range(self.size):
            out[(owner == r).to(self.device)] = recv[r][:counts[r]]
        return out

    def close(self) -> None:
        dist.destroy_process_group()
