"""One spawned process per sequence-parallel rank on this machine, without Ray.

The driver talks to each rank over a pipe: requests and answers are pickled by value (so no
shared-memory handle outlives a call) and carry the call's id, and a rank's process sentinel is
watched beside its pipe, so a rank that dies (killed, out of memory) is noticed at once. Failures
follow MultiRankExecutor's policy.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import sys
import time
from multiprocessing.connection import wait

import torch

from model_executor.parallel import DistributedInit
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine.executor.base import MultiRankExecutor, died
from sparsed_engine.executor.worker_call import call_worker, describe

STOP_TIMEOUT_S = 10.0   # a rank asked to stop that has not exited by then is killed
CALL_ID = struct.Struct("<q")
# The exit status of a rank's process that found itself re-running the user's script (below).
MAIN_GUARD_EXIT = 87
MAIN_GUARD_HELP = ("the script that created the LLM ran again in each rank's process, which imports "
                   "the main module: create the LLM under `if __name__ == \"__main__\":` (as every "
                   "script must when distributed_executor_backend=\"mp\" starts processes)")


def _send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _answer(conn, call_id: int, status: str, value) -> None:
    """The call id comes first, apart from the pickle, so the driver can drop an answer unread."""
    conn.send_bytes(CALL_ID.pack(call_id) + pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL))


def _rank_main(conn, config: WorkerConfig, init: DistributedInit, threads: int) -> None:
    """A rank's process: build the Worker (answering as call 0), then answer (call id, request)
    messages with (call id, status, value) until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the driver's: it stops the ranks
    if config.device.startswith("cpu"):
        torch.set_num_threads(threads)   # CPU ranks share the cores instead of each taking all
    try:
        worker = Worker(config, init)
    except Exception as e:  # noqa: BLE001 - reported to the driver, which raises it
        _answer(conn, 0, "error", describe(e))
        return
    _answer(conn, 0, "ok", None)
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:
            break
        if msg is None:
            break
        call_id, request = msg
        try:
            method, args = pickle.loads(request)
        except Exception as e:  # noqa: BLE001 - e.g. a function this process cannot import
            _answer(conn, call_id, "error", describe(e))
            continue
        _answer(conn, call_id, *call_worker(worker, method, args))
    worker.close()


def _refuse_when_reimporting_main() -> None:
    """A spawned process first imports the parent's main module; a script without a main guard
    would build another LLM (and start more processes) in every rank. The flag is the one
    multiprocessing itself checks for this, set only while a spawned process imports main."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        print(f"sparsed_engine: {MAIN_GUARD_HELP}", file=sys.stderr, flush=True)
        raise SystemExit(MAIN_GUARD_EXIT)


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


class MpExecutor(MultiRankExecutor):
    name = "mp"

    def __init__(self, worker_config: WorkerConfig):
        _refuse_when_reimporting_main()
        device = torch.device(worker_config.device)
        n = self.num_ranks = worker_config.sequence_parallel_size
        gpus = None
        if device.type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            if len(gpus) < n:
                raise ValueError(f"sequence_parallel_size={n} needs {n} GPUs but this machine has {len(gpus)}; "
                                 f"distributed_executor_backend='ray' can use a cluster")
        super().__init__()
        self._call_id = 0   # the rank's answer to building its Worker is call 0
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
            self._calls.run(self._gather, "loading the model")
        except BaseException:
            self.shutdown()
            raise

    # ---------------------------------------------------------------- transport
    def _pack(self, method, args: tuple) -> bytes:
        return pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)

    def _send(self, request: bytes) -> None:
        self._call_id += 1
        for conn in self.conns:
            try:
                _send(conn, (self._call_id, request))
            except OSError:
                pass  # the rank is gone: its sentinel reports it

    def _next(self, pending: set[int], timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            conns = {self.conns[r]: r for r in pending}
            sentinels = {self.procs[r].sentinel: r for r in pending}
            ready = wait(list(conns) + list(sentinels), max(deadline - time.monotonic(), 0))
            if not ready:
                return None
            answered = [conns[obj] for obj in ready if obj in conns]   # answers first: a rank may answer, then exit
            if not answered:
                return (rank := sentinels[ready[0]]), "died", self._death(rank)
            rank = answered[0]
            try:
                answer = self.conns[rank].recv_bytes()
            except (EOFError, OSError):
                return rank, "died", self._death(rank)
            if CALL_ID.unpack_from(answer)[0] == self._call_id:
                return rank, *pickle.loads(memoryview(answer)[CALL_ID.size:])
            # else: the answer to a call whose gathering ended early (an answer could not be
            # unpickled here): dropped unread, so it is never taken for this call's

    def _death(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)
        return MAIN_GUARD_HELP if proc.exitcode == MAIN_GUARD_EXIT else died(proc.exitcode)

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
