"""One worker in this process."""
from __future__ import annotations

from attention_backends.base import PoolSpec
from model_executor.step_input import StepInput
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import Executor


class UniProcExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig):
        self.worker = Worker(worker_config)

    def available_pool_bytes(self, fraction: float) -> int:
        return self.worker.available_pool_bytes(fraction)

    def init_pool(self, spec: PoolSpec) -> None:
        self.worker.init_pool(spec)

    def execute(self, step: StepInput):
        return self.worker.execute(step)

    def pool_usage(self) -> dict:
        return self.worker.pool_usage()

    def shutdown(self) -> None:
        self.worker = None
