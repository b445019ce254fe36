"""Executors run the workers: `uni` in this process, `ray` one Ray actor per rank, `mp` one local
process per rank."""
from __future__ import annotations

from model_executor.worker import WorkerConfig
from sparsed_engine.executor.base import Executor


def make_executor(backend: str, worker_config: WorkerConfig) -> Executor:
    """The executor named by EngineConfig.distributed_executor_backend (Ray is imported only here)."""
    if backend == "ray":
        from sparsed_engine.executor.ray_executor import RayExecutor
        return RayExecutor(worker_config)
    if backend == "mp":
        from sparsed_engine.executor.mp_executor import MpExecutor
        return MpExecutor(worker_config)
    from sparsed_engine.executor.uniproc import UniProcExecutor
    return UniProcExecutor(worker_config)
