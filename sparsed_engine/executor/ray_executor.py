"""One Ray actor per sequence-parallel rank, all in one placement group; rank 0 returns the logits.

Ray is imported only when this executor is built, so the rest of the package works without it.
It joins the Ray instance already running in this process (or RAY_ADDRESS's cluster), else starts
a small local one, and gives back everything it took at shutdown. A worker that dies or raises
leaves its peers blocked in collectives, so any failure releases the whole group and every later
call raises ExecutorDeadError.
"""
from __future__ import annotations

import os
import socket
import time

import torch

from model_executor.parallel import DistributedInit
from model_executor.step_input import StepInput
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import ExecutorDeadError, MultiRankExecutor, worker_timeout_s

PLACEMENT_TIMEOUT_S = 60       # the cluster lacks the GPUs asked for if they are not free by then
FAILURE_GRACE_S = 2.0          # after one rank fails, wait this long for the others to report why
OBJECT_STORE_BYTES = 1 << 30   # a local Ray's object store: step inputs and rank 0's logits pass through


class RayWorker:
    """The actor hosting one rank's Worker."""

    def __init__(self):
        self.worker: Worker | None = None

    def rendezvous_address(self) -> str:
        """A torch.distributed init method on this actor's node (rank 0's): its IP and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, config: WorkerConfig, init: DistributedInit) -> None:
        self.worker = Worker(config, init)

    def execute(self, step: StepInput) -> list | None:
        """Rank 0: logits per row as numpy arrays, which Ray moves to the driver without copying
        (torch tensors are pickled, several times slower)."""
        logits = self.worker.execute(step)
        return None if logits is None else [t.cpu().numpy() for t in logits]

    def call(self, method, *args):
        """A Worker method by name, or any function called as fn(worker, *args)."""
        fn = method if callable(method) else getattr(Worker, method)
        return fn(self.worker, *args)


class RayExecutor(MultiRankExecutor):
    def __init__(self, worker_config: WorkerConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.timeout_s = worker_timeout_s()
        self.device = torch.device(worker_config.device)
        n = worker_config.sequence_parallel_size
        gpu = self.device.type == "cuda"
        self.workers: list = []
        self._pg = None
        self._owns_ray = _connect(ray, n, gpu)
        try:
            bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
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
            init_method = self._wait([self.workers[0].rendezvous_address.remote()], "starting")[0]
            self._wait([w.start.remote(worker_config, DistributedInit(rank, init_method))
                        for rank, w in enumerate(self.workers)], "loading the model")
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------------- Executor
    def execute(self, step: StepInput) -> list[torch.Tensor]:
        self.check_alive()
        ref = self._ray.put(step)  # serialised once, read by every rank
        logits = self._wait([w.execute.remote(ref) for w in self.workers], "running a step")[0]
        return [torch.tensor(a, device=self.device) for a in logits]  # a copy: Ray's arrays are read-only

    def collective_rpc(self, method, *args) -> list:
        """Run a Worker method (by name) or fn(worker, *args) on every rank; results in rank order."""
        self.check_alive()
        name = getattr(method, "__name__", method)
        return self._wait([w.call.remote(method, *args) for w in self.workers], f"running {name}")

    def shutdown(self) -> None:
        if self.dead is None:
            self.dead = "the Ray executor was shut down"
        self._release()

    # ---------------------------------------------------------------- failures
    def _wait(self, refs: list, what: str) -> list:
        """Results of one call per rank; the first failure (an actor death preferred) or a rank
        still busy after timeout_s kills the group."""
        ray = self._ray
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                self.dead = f"the Ray executor is dead: {self.hung([rank_of[r] for r in pending], what)}"
                self._release()
                raise ExecutorDeadError(self.dead)
            (ref,) = done
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayError as e:
                errors = {rank_of[ref]: e} | self._errors_within_grace(pending, rank_of)
                rank, err = min(errors.items(),
                                key=lambda kv: (not isinstance(kv[1], ray.exceptions.RayActorError), kv[0]))
                self.dead = (f"the Ray executor is dead: worker rank {rank} failed while {what}: "
                              f"{_describe(ray, err)}")
                self._release()
                raise ExecutorDeadError(self.dead) from err
        return results

    def _errors_within_grace(self, pending: list, rank_of: dict) -> dict:
        """Errors the other ranks report soon after the first: a peer of a dead rank fails too,
        and the death, not the broken collective, is the cause worth naming."""
        ray, errors = self._ray, {}
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S) if pending else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                errors[rank_of[ref]] = e
        return errors

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
        self.workers, self._pg, self._owns_ray = [], None, False


def _connect(ray, num_workers: int, gpu: bool) -> bool:
    """Use the Ray this process already runs, else join RAY_ADDRESS's cluster, else start a local
    instance sized for the workers. True when this executor must disconnect it at shutdown."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the address in RAY_ADDRESS
        return True
    if gpu and torch.cuda.device_count() < num_workers:
        raise ValueError(f"sequence_parallel_size={num_workers} needs {num_workers} GPUs but this machine "
                         f"has {torch.cuda.device_count()}; set RAY_ADDRESS to use a Ray cluster")
    ray.init(address="local", num_cpus=num_workers, num_gpus=num_workers if gpu else 0,
             object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False)
    return True


def _describe(ray, err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:  # what the worker raised
        return f"{type(cause).__name__}: {cause}"
    if isinstance(err, ray.exceptions.RayActorError):
        return "its process died (killed, out of memory or crashed)"
    return str(err).strip().splitlines()[0]
