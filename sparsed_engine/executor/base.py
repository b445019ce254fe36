"""What the engine asks of an executor; where the workers run is the executor's business."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from attention_backends.base import PoolSpec
from model_executor.step_input import StepInput


class ExecutorDeadError(RuntimeError):
    """A worker died or failed (or the executor was shut down): no step can run any more."""


class Executor(ABC):
    @abstractmethod
    def available_pool_bytes(self, fraction: float) -> int:
        """Bytes the pattern pool may take on every worker (after the model is loaded)."""

    @abstractmethod
    def init_pool(self, spec: PoolSpec) -> None:
        """Allocate the pattern pool tensors on every worker."""

    @abstractmethod
    def execute(self, step: StepInput) -> list[torch.Tensor]:
        """Run one step; logits [M_i, vocab] (float32) for every row's logits positions."""

    @abstractmethod
    def pool_usage(self) -> dict:
        """Worker-side pool facts (bytes allocated) for engine stats."""

    def shutdown(self) -> None:
        """Release workers and devices."""


class MultiRankExecutor(Executor):
    """An executor of several ranks: the engine's pool calls become collective calls."""
    dead: str | None = None   # why no call can run any more, once a worker failed or shutdown ran

    @abstractmethod
    def collective_rpc(self, method, *args) -> list:
        """Run a Worker method (by name) or fn(worker, *args) on every rank; results in rank order."""

    def available_pool_bytes(self, fraction: float) -> int:
        return min(self.collective_rpc("available_pool_bytes", fraction))

    def init_pool(self, spec: PoolSpec) -> None:
        self.collective_rpc("init_pool", spec)

    def pool_usage(self) -> dict:
        usages = self.collective_rpc("pool_usage")
        return {key: sum(u[key] for u in usages) for key in usages[0]}  # summed over ranks

    def check_alive(self) -> None:
        if self.dead is not None:
            raise ExecutorDeadError(self.dead)
