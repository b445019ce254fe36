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
