"""What the engine asks of an executor; where the workers run is the executor's business."""
from __future__ import annotations

import os
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


def worker_timeout_s() -> float:
    """How long a call on the ranks may take before the group is declared hung (a step at 64k
    takes seconds; the first one also compiles kernels, and loading a model reads every weight)."""
    raw = os.environ.get(WORKER_TIMEOUT_ENV, "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{WORKER_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return value


WORKER_TIMEOUT_ENV = "SPARSED_WORKER_TIMEOUT_S"


class MultiRankExecutor(Executor):
    """An executor of several ranks: the engine's pool calls become collective calls."""
    dead: str | None = None   # why no call can run any more, once a worker failed or shutdown ran
    timeout_s: float          # set by each executor from worker_timeout_s()

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

    def hung(self, ranks, what: str) -> str:
        return (f"worker rank {', '.join(map(str, sorted(ranks)))} did not answer within {self.timeout_s:g} s "
                f"while {what} (hung; {WORKER_TIMEOUT_ENV} sets the limit)")
