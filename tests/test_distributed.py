"""Sequence parallelism: rank layout and sharding, sharded workers against one worker (two gloo
processes, no Ray), and the Ray and mp executors end to end (outputs, a killed worker, shutdown)."""
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from attention_backends.base import DENSE, SELECT, SPARSE, AttentionLayout, PoolSpec, RowSpec
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from model_executor.parallel import DistributedInit, TokenShard, kv_repeats, rank_layout
from model_executor.step_input import RowInput, StepInput
from model_executor.worker import Worker, WorkerConfig
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.executor.base import ExecutorDeadError
from tests.ports import free_ports
from tests.tiny_checkpoints import write_tiny_dream

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'sparsed-engine[ray]')")

SP = 2
SPARSE_KW = dict(attention_backend="sparsed", attention_config={"block_size": 16}, mask_pool_bytes=1 << 20)


# ---------------------------------------------------------------- layout and shards
def test_rank_layout():
    llada = AttentionLayout(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, scale=0.1)
    assert (rank_layout(llada, 4).num_heads, rank_layout(llada, 4).num_kv_heads) == (8, 8)
    assert rank_layout(llada, 4).total_heads == 32
    dream = AttentionLayout(num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, scale=0.1)
    assert (rank_layout(dream, 2).num_heads, rank_layout(dream, 2).num_kv_heads) == (14, 2)
    # more ranks than KV heads: each rank gets copies of the KV heads its query heads use
    gqa = AttentionLayout(num_layers=2, num_heads=32, num_kv_heads=4, head_dim=128, scale=0.1)
    assert (rank_layout(gqa, 8).num_heads, rank_layout(gqa, 8).num_kv_heads) == (4, 1)
    assert (rank_layout(dream, 14).num_heads, rank_layout(dream, 14).num_kv_heads) == (2, 2)
    assert [kv_repeats(4, sp) for sp in (1, 2, 4, 7, 8, 14)] == [1, 1, 1, 7, 2, 7]
    with pytest.raises(ValueError, match="sequence_parallel_size=3 must divide the model's 28"):
        rank_layout(dream, 3)


def test_token_shards_cover_the_batch_once():
    x = torch.arange(11)
    shards = [TokenShard(11, 4, r) for r in range(4)]
    parts = [s.take(x) for s in shards]
    assert all(p.numel() == 3 for p in parts)
    assert torch.equal(torch.cat(parts)[:11], x) and parts[-1].tolist() == [9, 10, 0]


def test_bad_parallel_settings_fail_before_work(tiny_llada_dir):
    with pytest.raises(ValueError, match="sequence_parallel_size=3 must divide the model's 4 attention heads"):
        # mp: the default backend here is Ray, which a machine may lack (its own error would come first)
        LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=3, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match="distributed_executor_backend='uni'.*needs 'ray'"):
        LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="sequence_parallel_size=0"):
        LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=0)


# ---------------------------------------------------------------- sharded workers, no Ray
# One batch of two rows whose total (87) is odd, run dense, then selecting, then sparse.
_LENGTHS, _PROMPTS, _BS, _STEPS = (37, 50), (20, 30), 16, 10


def _steps(backend: str, layout: AttentionLayout) -> list[StepInput]:
    g = torch.Generator().manual_seed(0)
    cfg = SparseDConfig(block_size=_BS) if backend == "sparsed" else None
    ids, offset = [], 0
    for n in _LENGTHS:
        blocks = SparseDBackend.pattern_blocks_needed(layout, n, cfg, 4096, _STEPS) if cfg else 0
        ids.append(tuple(range(offset, offset + blocks)))
        offset += blocks
    phases = (DENSE, SELECT, SPARSE) if cfg else (DENSE,)
    return [StepInput([RowInput(torch.randint(0, 300, (n,), generator=g), torch.arange(p - 3, n, 2),
                                RowSpec(n, p, phase, b if phase != DENSE else (), cfg))
                       for n, p, b in zip(_LENGTHS, _PROMPTS, ids)]) for phase in phases]


def _run(worker: Worker, backend: str) -> dict:
    steps = _steps(backend, worker.backend.layout)
    worker.init_pool(PoolSpec(64, 4096))
    logits = [worker.execute(s) for s in steps]
    inner = getattr(worker.backend, "inner", worker.backend)
    tiles = []
    if backend == "sparsed":
        meta = inner.build_metadata([r.spec for r in steps[-1].rows])
        tiles = [inner.load_tiles(row, layer) for row in meta.rows for layer in range(2)]
    return {"logits": logits, "tiles": tiles}


def _rank_main(rank: int, ports: list[int], cases: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    for i, ((model_dir, backend), port) in enumerate(zip(cases, ports)):
        config = WorkerConfig(str(model_dir), torch.float32, "cpu", backend, sequence_parallel_size=SP)
        worker = Worker(config, DistributedInit(rank, f"tcp://127.0.0.1:{port}"))
        torch.save(_run(worker, backend), os.path.join(out_dir, f"{i}-{rank}.pt"))
        worker.close()


def test_sharded_workers_match_one_worker(tmp_path, tiny_llada_dir, tiny_dream_dir):
    """Logits agree with one worker, and each rank holds exactly its own heads' SparseD pattern,
    including Dream with a single KV head (replicated onto both ranks)."""
    dream_1kv = write_tiny_dream(tmp_path / "dream_1kv", num_key_value_heads=1)
    cases = [(tiny_llada_dir, "sparsed"), (tiny_dream_dir, "sparsed"), (dream_1kv, "sparsed"),
             (tiny_dream_dir, "dense")]
    mp.spawn(_rank_main, args=(free_ports(len(cases)), cases, str(tmp_path)), nprocs=SP)
    for i, (model_dir, backend) in enumerate(cases):
        one = _run(Worker(WorkerConfig(str(model_dir), torch.float32, "cpu", backend)), backend)
        ranks = [torch.load(tmp_path / f"{i}-{r}.pt") for r in range(SP)]
        assert all(x is None for x in ranks[1]["logits"])
        for got, want in zip(ranks[0]["logits"], one["logits"]):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        for j, want in enumerate(one["tiles"]):  # [H, nb, nb]; rank r holds heads r*H/SP ..
            assert not want.all()
            assert torch.equal(torch.cat([rk["tiles"][j] for rk in ranks]), want), (model_dir, j)


# ---------------------------------------------------------------- the Ray executor
def _ray_children() -> list[str]:
    """Ray daemons and workers descended from this process."""
    children, found = {}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # exited, not yet reaped
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append((int(pid), cmd))
    todo = [os.getpid()]
    while todo:
        for pid, cmd in children.get(todo.pop(), []):
            todo.append(pid)
            if "ray" in cmd:
                found.append(cmd[:80])
    return found


def _params():
    return [SamplingParams(max_tokens=64, steps=8, block_length=32),
            SamplingParams(max_tokens=32, steps=8, temperature=0.8, seed=3)]


_PROMPT_IDS = [list(range(5, 42)), list(range(50, 63))]  # canvases of 101 and 45 tokens


@needs_ray
def test_llm_starts_and_releases_its_own_ray(tiny_llada_dir):
    """Runs first, with no Ray in the process: the executor starts one and shutdown stops it."""
    assert not ray.is_initialized()
    with LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP, distributed_executor_backend="ray") as llm:
        assert ray.is_initialized()
        assert llm.generate(_PROMPT_IDS[:1], _params()[0], use_tqdm=False)[0].finished
    assert not ray.is_initialized()
    deadline = time.time() + 20
    while _ray_children() and time.time() < deadline:
        time.sleep(0.2)
    assert _ray_children() == []
    with pytest.raises(RuntimeError, match="was shut down"):
        llm.generate(_PROMPT_IDS[:1], _params()[0], use_tqdm=False)


@pytest.fixture(scope="module")
def ray_session():
    """One small Ray for the rest of the module; executors join it and leave it running."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 << 20)
    yield
    ray.shutdown()


@needs_ray
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("backend", ["dense", "sparsed"])
def test_ray_outputs_equal_single_process(ray_session, request, family, backend):
    model = str(request.getfixturevalue(f"tiny_{family}_dir"))
    kw = SPARSE_KW if backend == "sparsed" else {"attention_backend": "dense"}
    want = LLM(device="cpu", model=model, **kw).generate(_PROMPT_IDS, _params(), use_tqdm=False)
    llm = LLM(device="cpu", model=model, sequence_parallel_size=SP, **kw)
    got = llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    if backend == "sparsed":
        assert llm.get_stats()["mask_pool"]["allocated_bytes"] == SP * (1 << 20)
    llm.shutdown()
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@needs_ray
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_four_workers_equal_single_process(ray_session, request, family):
    """Four ranks: one query head each; Dream's two KV heads are replicated across them."""
    model = str(request.getfixturevalue(f"tiny_{family}_dir"))
    want = LLM(device="cpu", model=model, **SPARSE_KW).generate(_PROMPT_IDS, _params(), use_tqdm=False)
    with LLM(device="cpu", model=model, sequence_parallel_size=4, **SPARSE_KW) as llm:
        got = llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@needs_ray
def test_killed_worker_fails_requests_fast(ray_session, tiny_llada_dir):
    llm = LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP)
    ray.kill(llm.llm_engine.executor.workers[1])
    t0 = time.time()
    with pytest.raises(ExecutorDeadError, match="worker rank 1 failed while running a step: its process died"):
        llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    assert time.time() - t0 < 30
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ExecutorDeadError, match="the Ray executor is dead: worker rank 1"):
        llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    llm.shutdown()


# ---------------------------------------------------------------- the mp executor (no Ray)
@pytest.mark.parametrize("family,backend", [("llada", "sparsed"), ("dream", "dense")])
def test_mp_outputs_equal_single_process(request, family, backend):
    model = str(request.getfixturevalue(f"tiny_{family}_dir"))
    kw = SPARSE_KW if backend == "sparsed" else {"attention_backend": "dense"}
    want = LLM(device="cpu", model=model, **kw).generate(_PROMPT_IDS, _params(), use_tqdm=False)
    with LLM(device="cpu", model=model, sequence_parallel_size=SP, distributed_executor_backend="mp", **kw) as llm:
        got = llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
        if backend == "sparsed":
            assert llm.get_stats()["mask_pool"]["allocated_bytes"] == SP * (1 << 20)
        procs = list(llm.llm_engine.executor.procs)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert procs and not any(p.is_alive() for p in procs)   # shutdown ended every rank's process


def test_mp_killed_worker_fails_requests_fast(tiny_llada_dir):
    llm = LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP, distributed_executor_backend="mp")
    procs = list(llm.llm_engine.executor.procs)
    os.kill(procs[1].pid, 9)
    t0 = time.time()
    with pytest.raises(ExecutorDeadError, match=r"worker rank 1 failed while running a step: its process died \(exit code -9"):
        llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    assert time.time() - t0 < 30
    assert not llm.llm_engine.has_unfinished_requests()
    assert not any(p.is_alive() for p in procs)   # the surviving rank was released too
    with pytest.raises(ExecutorDeadError, match="the mp executor is dead: worker rank 1"):
        llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    llm.shutdown()


def _raise_on_rank_1(worker):
    if worker.group.rank == 1:
        raise MemoryError("simulated out of memory")
    return worker.group.rank


def test_mp_worker_exception_is_reported(tiny_llada_dir):
    llm = LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP, distributed_executor_backend="mp")
    with pytest.raises(ExecutorDeadError, match="worker rank 1 failed while running _raise_on_rank_1: "
                                                "MemoryError: simulated out of memory"):
        llm.llm_engine.executor.collective_rpc(_raise_on_rank_1)
    llm.shutdown()


def _hang_on_rank_1(worker):
    if worker.group.rank == 1:
        time.sleep(60)
    return worker.group.rank


@pytest.mark.parametrize("executor", ["mp", pytest.param("ray", marks=needs_ray)])
def test_hung_worker_times_out(request, tiny_llada_dir, executor):
    if executor == "ray":
        request.getfixturevalue("ray_session")
        # the actors cannot import this test module: send the function itself
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        request.addfinalizer(lambda: ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__]))
    llm = LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP, distributed_executor_backend=executor)
    llm.llm_engine.executor.timeout_s = 2.0
    t0 = time.time()
    with pytest.raises(ExecutorDeadError, match=f"the {executor.capitalize() if executor == 'ray' else executor} "
                       r"executor is dead: worker rank 1 did not answer within 2 s while running _hang_on_rank_1"):
        llm.llm_engine.executor.collective_rpc(_hang_on_rank_1)
    assert time.time() - t0 < 20
    with pytest.raises(ExecutorDeadError, match="did not answer"):
        llm.generate(_PROMPT_IDS, _params(), use_tqdm=False)
    llm.shutdown()


def test_bad_worker_timeout_fails_before_work(tiny_llada_dir, monkeypatch):
    monkeypatch.setenv("SPARSED_WORKER_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SPARSED_WORKER_TIMEOUT_S='soon': must be a number of seconds > 0"):
        LLM(device="cpu", model=str(tiny_llada_dir), sequence_parallel_size=SP, distributed_executor_backend="mp")


def test_skip_tokenizer_init_takes_token_ids(tiny_llada_dir):
    """What benchmarks/distributed.py relies on: a model folder with no tokenizer use."""
    llm = LLM(device="cpu", model=str(tiny_llada_dir), skip_tokenizer_init=True)
    assert llm.get_tokenizer() is None
    out = llm.generate([_PROMPT_IDS[1]], _params()[0], use_tqdm=False)[0].outputs[0]
    assert out.text == "" and out.finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="is text but skip_tokenizer_init=True"):
        llm.generate("hello", _params()[0], use_tqdm=False)
    with pytest.raises(ValueError, match="stop=.*needs the tokenizer"):
        llm.generate([_PROMPT_IDS[1]], SamplingParams(max_tokens=8, stop=["x"]), use_tqdm=False)
