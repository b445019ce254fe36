"""One worker in this process."""
from __future__ import annotations

from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import Executor, ExecutorDeadError
from sparsed_engine.executor.worker_call import run_method


class UniProcExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig):
        self.worker: Worker | None = Worker(worker_config)

    def collective_rpc(self, method, *args) -> list:
        if self.worker is None:
            raise ExecutorDeadError("the uni executor was shut down")
        return [run_method(self.worker, method, args)]

    def shutdown(self) -> None:
        self.worker = None
