"""A worker: one device, the model on it, its attention backend and that backend's pattern pool.

With sequence parallelism a worker is one rank: its backend holds the rank's heads (wrapped so
the model sees token shards) and it meets its peers through `DistributedInit`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attention_backends.base import KVPoolSpec, PoolSpec
from attention_backends.registry import get_backend_class
from model_executor.families import get_family
from model_executor.model_loader import load_model, read_model_info
from model_executor.model_runner import ModelRunner
from model_executor.parallel import DistributedInit, SequenceParallelGroup, UlyssesBackend, rank_layout
from model_executor.sampler import Sampler
from model_executor.step_input import SampledTokens, StepInput


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    dtype: torch.dtype
    device: str
    attention_backend: str
    load_format: str = "auto"
    sequence_parallel_size: int = 1


class Worker:
    def __init__(self, config: WorkerConfig, dist_init: DistributedInit | None = None):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:  # NCCL wants an explicit index
            self.device = torch.device("cuda", torch.cuda.current_device())
        info = read_model_info(config.model)
        sp = config.sequence_parallel_size
        backend = get_backend_class(config.attention_backend)(
            rank_layout(info.attention_layout, sp), self.device, config.dtype)
        self.group = None
        if sp > 1:
            self.group = SequenceParallelGroup(sp, dist_init, self.device)
            backend = UlyssesBackend(backend, self.group)
        self.backend = backend
        self.model = load_model(info, backend, config.dtype, self.device, config.load_format)
        self.runner = ModelRunner(self.model, self.backend, self.device, self.group)
        self.sampler = Sampler(get_family(info.family).denoiser, self.device, info.mask_token_id)  # used on rank 0 only

    def available_pool_bytes(self, fraction: float) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(free * fraction)

    def init_pool(self, spec: PoolSpec) -> None:
        self.backend.init_pool(spec)

    def pool_usage(self) -> dict:
        return self.backend.pool_usage()

    def init_kv_pool(self, spec: KVPoolSpec) -> None:
        self.backend.init_kv_pool(spec)

    def kv_pool_usage(self) -> dict:
        return self.backend.kv_pool_usage()

    def execute(self, step: StepInput) -> list[SampledTokens] | list[torch.Tensor] | None:
        """Rank 0 (or the single worker): what each request committed, as plain CPU data (or,
        when the step asks for no sampling, every row's logits on the CPU). None on other ranks."""
        self.sampler.free(step.finished_seq_ids)
        if not step.rows:
            return [] if self.group is None or self.group.rank == 0 else None
        logits = self.runner.run(step)
        if logits is None:
            return None
        if step.sampling is None:
            return [t.cpu() for t in logits]
        return self.sampler.sample(step.rows, logits, step.sampling)

    def close(self) -> None:
        """Leave the sequence-parallel group (so this process may join another)."""
        if self.group is not None:
            self.group.close()
            self.group = None
