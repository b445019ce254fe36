"""One Ray actor per sequence-parallel rank, all in one placement group.

Ray is imported only when this executor is built, so the rest of the package works without it.
It joins the Ray instance already running in this process (or RAY_ADDRESS's cluster), else starts
a small local one (no dashboard UI, no usage stats, ended by a watchdog if this process is killed),
and gives back everything it took at shutdown. Failures follow MultiRankExecutor's policy; each
call's answers are its own ObjectRefs, so an abandoned call's can never be taken for a later one's.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model_executor.parallel import DistributedInit
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import MultiRankExecutor, died
from sparsed_engine.executor.worker_call import call_worker, describe

PLACEMENT_TIMEOUT_S = 60       # resources the cluster reported free are placed by then, or it fails
RESOURCE_WAIT_S = 5.0          # resources held by a group being released are back by then
OBJECT_STORE_BYTES = 1 << 30   # a local Ray's object store: step inputs and answers pass through
WATCHDOG = Path(__file__).with_name("ray_watchdog.py")


class RayWorker:
    """The actor hosting one rank's Worker."""

    def __init__(self):
        self.worker: Worker | None = None

    def rendezvous_address(self) -> tuple[str, str]:
        """A torch.distributed init method on this actor's node (rank 0's): its IP and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return "ok", f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, config: WorkerConfig, init: DistributedInit) -> tuple[str, object]:
        try:
            self.worker = Worker(config, init)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which raises it
            return "error", describe(e)
        return "ok", None

    def call(self, request: tuple) -> tuple[str, object]:
        method, args = request
        return call_worker(self.worker, method, args)


class RayExecutor(MultiRankExecutor):
    name = "Ray"

    def __init__(self, worker_config: WorkerConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        super().__init__()
        n = self.num_ranks = worker_config.sequence_parallel_size
        gpu = torch.device(worker_config.device).type == "cuda"
        self.workers: list = []
        self._refs: dict[int, object] = {}
        self._pg = None
        self._watchdog = None
        try:
            self._owns_ray = False
            self._owns_ray, self._watchdog = _connect(ray, n, gpu)
            bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
            _wait_for_resources(ray, bundle, n)
            self._pg = placement_group([bundle] * n, strategy="PACK")
            try:
                ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"Ray could not place {n} workers of {bundle} within {PLACEMENT_TIMEOUT_S}s; "
                    f"the cluster has {ray.cluster_resources()} ({ray.available_resources()} free)") from None
            actor = ray.remote(RayWorker)
            self.workers = [
                actor.options(num_cpus=1, num_gpus=int(gpu), scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=rank)).remote()
                for rank in range(n)]
            self._calls.run(self._start, worker_config)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, worker_config: WorkerConfig) -> None:
        self._refs = {0: self.workers[0].rendezvous_address.remote()}
        (init_method,) = self._gather("starting", [0])
        self._refs = {rank: w.start.remote(worker_config, DistributedInit(rank, init_method))
                      for rank, w in enumerate(self.workers)}
        self._gather("loading the model")

    # ---------------------------------------------------------------- transport
    def _pack(self, method, args: tuple):
        return self._ray.put((method, args))  # serialised once, read by every rank

    def _send(self, request) -> None:
        self._refs = {rank: w.call.remote(request) for rank, w in enumerate(self.workers)}

    def _next(self, pending: set[int], timeout: float):
        ray = self._ray
        rank_of = {self._refs[r]: r for r in pending}
        done, _ = ray.wait(list(rank_of), num_returns=1, timeout=timeout)
        if not done:
            return None
        rank = rank_of[done[0]]
        try:
            status, value = ray.get(done[0])
        except ray.exceptions.RayActorError:
            return rank, "died", died(None)
        except ray.exceptions.RayError as e:   # not raised by the Worker: e.g. an argument the actor cannot load
            cause = getattr(e, "cause", None)
            return rank, "error", describe(cause) if cause is not None else str(e).strip().splitlines()[0]
        return rank, status, value

    def _release(self) -> None:
        """Kill the actors (freeing their GPUs), remove the placement group, stop a Ray we started."""
        ray = self._ray
        if ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for w in self.workers:
                ray.kill(w)
            if self._pg is not None:
                remove_placement_group(self._pg)
            if self._owns_ray:
                ray.shutdown()
        if self._watchdog is not None:   # it ends what is left of the local Ray, then exits
            self._watchdog.stdin.close()
            self._watchdog.wait()
        self.workers, self._refs, self._pg, self._owns_ray, self._watchdog = [], {}, None, False, None


def _connect(ray, num_workers: int, gpu: bool):
    """Use the Ray this process already runs, else join RAY_ADDRESS's cluster, else start a local
    instance sized for the workers. Returns (whether this executor must disconnect it at shutdown,
    the watchdog process of a local instance)."""
    if ray.is_initialized():
        return False, None
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the address in RAY_ADDRESS
        return True, None
    if gpu and torch.cuda.device_count() < num_workers:
        raise ValueError(f"sequence_parallel_size={num_workers} needs {num_workers} GPUs but this machine "
                         f"has {torch.cuda.device_count()}; set RAY_ADDRESS to use a Ray cluster")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # read by Ray's processes at their start
    temp_dir = tempfile.mkdtemp(prefix="sparsed-ray-")
    # Started first, so that the instance cannot outlive this process unwatched. Its stdin is a pipe
    # only this process writes: when this process ends, however, the pipe closes and the watchdog
    # kills every process of the instance (found by its temp dir) and removes the dir.
    watchdog = subprocess.Popen([sys.executable, "-I", str(WATCHDOG), temp_dir], stdin=subprocess.PIPE,
                                start_new_session=True)
    try:
        ray.init(address="local", num_cpus=num_workers, num_gpus=num_workers if gpu else 0,
                 object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, _temp_dir=temp_dir)
    except BaseException:
        watchdog.stdin.close()
        watchdog.wait()
        raise
    return True, watchdog


def _wait_for_resources(ray, bundle: dict, n: int) -> None:
    """Fail at once, naming what was asked and what there is, when the cluster cannot hold n
    bundles: too few in all, or too few free for RESOURCE_WAIT_S (another job holds them)."""
    deadline = time.monotonic() + RESOURCE_WAIT_S
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {key: n * per for key, per in bundle.items() if free.get(key, 0) < n * per}
        if not short:
            return
        missing = ", ".join(f"{need:g} {key}s (the cluster has {total.get(key, 0):g}, "
                            f"{free.get(key, 0):g} free)" for key, need in short.items())
        if any(total.get(key, 0) < need for key, need in short.items()) or time.monotonic() > deadline:
            raise RuntimeError(f"sequence_parallel_size={n} asks Ray for {missing}: one per rank; "
                               f"free them (another LLM or Ray job holds them) or ask for fewer ranks")
        time.sleep(0.2)
