"""The executors' contract and their processes: the same failure texts from mp and Ray, answers
moved to the CPU whatever their shape, a local Ray that leaves nothing behind when its driver is
killed, resources that cannot be had refused in seconds, a script without a main guard refused
with what to do, and a worker timeout that is not a finite number refused before any worker starts."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparsed_engine import LLM
from sparsed_engine.executor.base import ExecutorDeadError
from sparsed_engine.executor.worker_call import to_cpu
from tests.child_env import child_env
from tests.tiny_checkpoints import write_tiny_llada

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed")


# ---------------------------------------------------------------- the contract
@dataclass(frozen=True)
class _Answer:
    ids: torch.Tensor
    note: str


def test_answers_are_moved_to_the_cpu_whatever_their_shape():
    pair = namedtuple("pair", "a b")
    meta = torch.ones(2, device="meta")   # stands for a device tensor: .cpu() of it must be called
    with pytest.raises(NotImplementedError):
        meta.cpu()
    x = torch.arange(3)
    got = to_cpu({"rows": [x, (x, pair(x, 1))], "out": _Answer(x, "n"), "n": None})
    assert got["rows"][1][1] == pair(x, 1) and isinstance(got["rows"][1][1], pair)
    assert isinstance(got["out"], _Answer) and torch.equal(got["out"].ids, x) and got["n"] is None


def test_uni_executor_runs_the_same_calls(tiny_llada_dir):
    llm = LLM(device="cpu", model=str(tiny_llada_dir))
    executor = llm.llm_engine.executor
    assert executor.collective_rpc(_rank) == [0]
    assert executor.pool_usage() == llm.llm_engine.executor.worker.pool_usage()
    llm.shutdown()
    with pytest.raises(ExecutorDeadError, match="the uni executor was shut down"):
        executor.collective_rpc(_rank)


def _rank(worker):
    return 0 if worker.group is None else worker.group.rank


def _raise_on_rank_1(worker):
    if _rank(worker) == 1:
        raise MemoryError("simulated out of memory")
    return _rank(worker)


def _explode():
    raise RuntimeError("this answer cannot be read here")


class _Unreadable:
    """Pickled fine by a rank; unpickling it in the driver raises."""

    def __reduce__(self):
        return _explode, ()


def _unreadable(worker):
    return _Unreadable()


def test_mp_answers_of_a_call_cut_short_are_not_taken_for_the_next(tiny_llada_dir):
    """The driver fails reading rank 0's (or 1's) answer; the other answer, left in its pipe, carries
    the old call id and is dropped, so the next call gets its own answers."""
    with LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=2, distributed_executor_backend="mp") as llm:
        with pytest.raises(RuntimeError, match="this answer cannot be read here"):
            llm.llm_engine.executor.collective_rpc(_unreadable)
        assert llm.llm_engine.executor.collective_rpc(_rank) == [0, 1]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 << 20)
    # the actors cannot import this test module: send its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@needs_ray
def test_a_raising_ray_rank_is_named_as_mp_names_it(ray_session, tiny_llada_dir):
    """The text the mp executor gives for it (test_distributed.py), from the Ray executor."""
    llm = LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=2, distributed_executor_backend="ray")
    assert llm.llm_engine.executor.collective_rpc(_rank) == [0, 1]
    with pytest.raises(ExecutorDeadError, match=r"^the Ray executor is dead: worker rank 1 failed while running "
                       r"_raise_on_rank_1: MemoryError: simulated out of memory \(at .*test_executor_processes.py:\d+\)$"):
        llm.llm_engine.executor.collective_rpc(_raise_on_rank_1)
    llm.shutdown()


# ---------------------------------------------------------------- resources Ray cannot give
@needs_ray
def test_ranks_the_cluster_cannot_hold_fail_in_seconds(ray_session, tmp_path):
    eight_heads = write_tiny_llada(tmp_path / "llada8", n_heads=8, n_kv_heads=8)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"sequence_parallel_size=8 asks Ray for 8 CPUs \(the cluster has 4, \d+ free\)"):
        LLM(device="cpu", model=str(eight_heads), sequence_parallel_size=8, distributed_executor_backend="ray")
    assert time.monotonic() - t0 < 10


@needs_ray
def test_ranks_another_job_holds_fail_in_seconds(ray_session, tiny_llada_dir):
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": 3}])
    ray.get(held.ready(), timeout=30)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"asks Ray for 2 CPUs \(the cluster has 4, 1 free\)"):
            LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=2, distributed_executor_backend="ray")
        assert time.monotonic() - t0 < 15
    finally:
        remove_placement_group(held)


# ---------------------------------------------------------------- a killed driver
def _session_processes(key: str, pids: dict) -> list[str]:
    """Live processes whose command line names `key`, or that are in `pids` (pid -> start time)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[0] != "Z" and (key in cmd or pids.get(int(pid)) == fields[19]):
            found.append(f"{pid} {cmd[:100]}")
    return found


def _descendants(root: int) -> dict:
    children, start = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(pid))
        start[int(pid)] = fields[19]
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found[pid] = start[pid]
            todo.append(pid)
    return found


@needs_ray
def test_a_killed_driver_leaves_no_ray_process(tiny_llada_dir):
    """kill -9 of a driver whose LLM started a local Ray: within seconds, no process of that Ray
    (daemons, agents, workers, found by its temp dir and as the driver's descendants) is left."""
    temp_root = tempfile.mkdtemp(prefix="sdt", dir="/tmp")   # short: Ray's socket paths live under it
    driver = textwrap.dedent(f"""
        from sparsed_engine import LLM
        if __name__ == "__main__":
            llm = LLM(device="cpu", model={str(tiny_llada_dir)!r}, sequence_parallel_size=2, distributed_executor_backend="ray")
            print("READY", flush=True)
            import time; time.sleep(300)
    """)
    env = child_env(TMPDIR=temp_root)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, env=env,
                            start_new_session=True)
    ours = {}
    try:
        assert proc.stdout.readline().startswith(b"READY")
        ours = _descendants(proc.pid)
        assert any("RayWorker" in p for p in _session_processes(temp_root, ours))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _session_processes(temp_root, ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_processes(temp_root, ours) == []
        assert list(Path(temp_root).glob("sparsed-ray-*")) == []   # the instance's temp dir was removed too
    finally:
        proc.kill()
        for pid in _session_processes(temp_root, ours):
            os.kill(int(pid.split()[0]), signal.SIGKILL)
        shutil.rmtree(temp_root, ignore_errors=True)


# ---------------------------------------------------------------- mp and the user's script
def test_mp_script_without_main_guard_is_told_what_to_do(tmp_path, tiny_llada_dir):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from sparsed_engine import LLM
        llm = LLM(device="cpu", model={str(tiny_llada_dir)!r}, sequence_parallel_size=2, distributed_executor_backend="mp")
        print("GENERATED", llm.generate([[5, 6, 7]], use_tqdm=False)[0].finished)
    """))
    env = child_env()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "GENERATED" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsed_engine.executor.base.ExecutorDeadError: the mp executor is dead: worker rank")
    assert 'create the LLM under `if __name__ == "__main__":`' in last


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0"])
def test_worker_timeout_must_be_finite_and_positive(tiny_llada_dir, monkeypatch, value):
    import multiprocessing

    monkeypatch.setenv("SPARSED_WORKER_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=f"SPARSED_WORKER_TIMEOUT_S='{value}': must be a number of seconds > 0"):
        LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=2, distributed_executor_backend="mp")
    assert multiprocessing.active_children() == []   # refused before any rank started
