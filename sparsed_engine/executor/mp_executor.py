"""One spawned process per sequence-parallel rank on this machine, without Ray; rank 0 returns the logits.

The driver talks to each rank over a pipe (messages pickled by value, so no shared-memory handles
outlive a step) and watches the processes' sentinels, so a rank that dies (killed, out of memory)
is noticed at once and one that raises reports its exception. Either way its peers would block in
collectives, so the whole group is released and every later call raises ExecutorDeadError.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import socket
import time
import traceback
from multiprocessing.connection import wait

import torch

from model_executor.parallel import DistributedInit
from model_executor.step_input import StepInput
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import ExecutorDeadError, MultiRankExecutor, worker_timeout_s

FAILURE_GRACE_S = 2.0   # after one rank fails, wait this long for the others to report why
STOP_TIMEOUT_S = 10.0   # a rank asked to stop that has not exited by then is killed


def _send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _rank_main(conn, config: WorkerConfig, init: DistributedInit, threads: int) -> None:
    """A rank's process: build the Worker, then answer (method, args) messages until None or EOF."""
    if config.device.startswith("cpu"):
        torch.set_num_threads(threads)   # CPU ranks share the cores instead of each taking all
    try:
        worker = Worker(config, init)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
        _send(conn, ("error", _describe(e)))
        return
    _send(conn, ("ok", None))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:
            break
        if msg is None:
            break
        method, args = msg
        try:
            if method == "execute":
                logits = worker.execute(*args)
                result = None if logits is None else [t.cpu() for t in logits]
            else:
                fn = method if callable(method) else getattr(Worker, method)
                result = fn(worker, *args)
            _send(conn, ("ok", result))
        except BaseException as e:  # noqa: BLE001
            _send(conn, ("error", _describe(e)))
    worker.close()


@contextlib.contextmanager
def _visible_gpu(gpu: str | None):
    """A spawned process inherits the environment at its start: show it only its rank's GPU (its
    cuda:0). This process's own CUDA, if started, has read the variable already and keeps its view."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _describe(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


class MpExecutor(MultiRankExecutor):
    def __init__(self, worker_config: WorkerConfig):
        self.device = torch.device(worker_config.device)
        self.timeout_s = worker_timeout_s()
        n = worker_config.sequence_parallel_size
        gpus = None
        if self.device.type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            if len(gpus) < n:
                raise ValueError(f"sequence_parallel_size={n} needs {n} GPUs but this machine has {len(gpus)}; "
                                 f"distributed_executor_backend='ray' can use a cluster")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        ctx = multiprocessing.get_context("spawn")   # CUDA cannot be forked
        threads = max(1, (os.cpu_count() or 1) // n)
        self.procs, self.conns = [], []
        try:
            for rank in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_rank_main, name=f"sparsed-rank-{rank}", daemon=True,
                                   args=(child, worker_config, DistributedInit(rank, init_method), threads))
                with _visible_gpu(gpus[rank] if gpus else None):
                    proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            self._gather("loading the model")
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------------- Executor
    def execute(self, step: StepInput) -> list[torch.Tensor]:
        return [t.to(self.device) for t in self._call("execute", step)[0]]

    def collective_rpc(self, method, *args) -> list:
        return self._call(method, *args)

    def shutdown(self) -> None:
        if self.dead is None:
            self.dead = "the mp executor was shut down"
        self._release()

    # ---------------------------------------------------------------- calls and failures
    def _call(self, method, *args) -> list:
        self.check_alive()
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)  # pickled once
        for conn in self.conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                pass  # the rank is gone: its sentinel reports it below
        return self._gather(f"running {getattr(method, '__name__', method)}" if method != "execute" else "running a step")

    def _gather(self, what: str) -> list:
        """One answer per rank; the first failure (a death preferred) or a rank still busy after
        timeout_s releases the group and raises."""
        results, pending = [None] * len(self.procs), set(range(len(self.procs)))
        deadline = time.monotonic() + self.timeout_s
        while pending:
            got = self._next(pending, timeout=max(deadline - time.monotonic(), 0))
            if got is None:
                self.dead = f"the mp executor is dead: {self.hung(pending, what)}"
                self._release()
                raise ExecutorDeadError(self.dead)
            rank, ok, value = got
            if ok:
                results[rank] = value
                pending.discard(rank)
                continue
            errors = {rank: value}
            pending.discard(rank)
            while pending:  # the peers of a failed rank fail too; name the death, not the broken collective
                got = self._next(pending, timeout=FAILURE_GRACE_S)
                if got is None:
                    break
                pending.discard(got[0])
                if not got[1]:
                    errors[got[0]] = got[2]
            rank, why = min(errors.items(), key=lambda kv: ("process died" not in kv[1], kv[0]))
            self.dead = f"the mp executor is dead: worker rank {rank} failed while {what}: {why}"
            self._release()
            raise ExecutorDeadError(self.dead)
        return results

    def _next(self, pending: set, timeout):
        """(rank, ok, value) of the next rank to answer or die, or None after `timeout` seconds."""
        conns = {self.conns[r]: r for r in pending}
        sentinels = {self.procs[r].sentinel: r for r in pending}
        ready = wait(list(conns) + list(sentinels), timeout)
        if not ready:
            return None
        for obj in ready:  # answers first: a rank may answer and then exit
            if obj in conns:
                rank = conns[obj]
                try:
                    status, value = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    return rank, False, self._death(rank)
                return rank, status == "ok", value
        return (rank := sentinels[ready[0]]), False, self._death(rank)

    def _death(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)
        return f"its process died (exit code {proc.exitcode}: killed, out of memory or crashed)"

    def _release(self) -> None:
        """Ask every rank to stop, kill those that do not, and close the pipes."""
        for conn in self.conns:
            try:
                _send(conn, None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(STOP_TIMEOUT_S / max(len(self.procs), 1))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
