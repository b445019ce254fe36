"""Throughput mode on the worker (KV.md): refresh rows run as in exact mode and store every layer's
K/V in the paged pool; cached rows compute only their span, store its fresh K/V and attend to the
whole row read back from the pool (densely, or over the stored SparseD pattern's tiles of their
query blocks). Driven with hand-built steps on the tiny checkpoints, no engine."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from attention_backends.base import DENSE, SELECT, SPARSE, AttentionBackend, KVPoolSpec, PoolSpec, RowSpec
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from model_executor.model_loader import load_model, read_model_info
from model_executor.parallel import DistributedInit
from model_executor.step_input import RowInput, StepInput
from model_executor.worker import Worker, WorkerConfig
from tests.ports import free_ports
from tests.tiny_checkpoints import write_tiny_dream

BS, PAGE, STEPS, VOCAB, NUM_PAGES = 16, 8, 10, 300, 48
# (canvas length, prompt length) of the rows; row i's current semi-AR block is [p + 8, p + 16)
ROWS = ((37, 20), (50, 30), (29, 12), (44, 25), (41, 22))
ATOL = 1e-4


def _block(i: int) -> tuple[int, int]:
    p = ROWS[i][1]
    return p + 8, p + 16


class Rig:
    """One worker and the fixed pages / pattern blocks of the rows in ROWS."""

    def __init__(self, worker: Worker, backend: str):
        self.w, self.sparsed = worker, backend == "sparsed"
        self.shift = worker.model.logits_shift
        self.cfg = SparseDConfig(block_size=BS) if self.sparsed else None
        layout = worker.backend.layout
        perm = torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(1)).tolist()
        self.pages, self.blocks, used, offset = [], [], 0, 0
        for n, _ in ROWS:
            k = -(-n // PAGE)
            self.pages.append(tuple(perm[used:used + k]))   # scattered, out of order
            used += k
            nb = SparseDBackend.pattern_blocks_needed(layout, n, self.cfg, 4096, STEPS) if self.sparsed else 0
            self.blocks.append(tuple(range(offset, offset + nb)))
            offset += nb
        worker.init_pool(PoolSpec(64, 4096))
        worker.init_kv_pool(KVPoolSpec(NUM_PAGES, PAGE))

    def span(self, i: int, mode: str) -> tuple[int, int]:
        """dual: the block; prefix: the block and everything after; one earlier with Dream's shift."""
        b0, b1 = _block(i)
        return b0 - self.shift, b1 if mode == "dual" else ROWS[i][0]

    def row(self, i: int, canvas: torch.Tensor, phase: str, kind: str, mode: str = "dual") -> RowInput:
        """kind: exact (no pages), refresh (pages, whole row) or cached (pages, the mode's span)."""
        n, p = ROWS[i]
        spec = RowSpec(n, p, phase, self.blocks[i] if phase != DENSE else (), self.cfg,
                       kv_pages=self.pages[i] if kind != "exact" else (),
                       computed=self.span(i, mode) if kind == "cached" else None)
        return RowInput(canvas, torch.arange(*_block(i)), spec)

    def run(self, *rows: RowInput) -> list[torch.Tensor]:
        return self.w.execute(StepInput(list(rows)))

    def tiles(self, i: int) -> list[torch.Tensor]:
        """The stored pattern of row i, per layer: bool [H, nb, nb]."""
        spec = RowSpec(ROWS[i][0], ROWS[i][1], SPARSE, self.blocks[i], self.cfg)
        backend = getattr(self.w.backend, "inner", self.w.backend)
        row = backend.build_metadata([spec]).rows[0]
        return [backend.load_tiles(row, layer) for layer in range(backend.layout.num_layers)]


def _worker(model_dir, backend: str) -> Worker:
    return Worker(WorkerConfig(str(model_dir), torch.float32, "cpu", backend))


def canvas(i: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS[i][0],), generator=torch.Generator().manual_seed(100 * seed + i))


def changed(c: torch.Tensor, span: tuple[int, int], seed: int = 7) -> torch.Tensor:
    """The canvas with every other position of the span (from its second on) replaced."""
    out = c.clone()
    pos = torch.arange(span[0] + 1, span[1], 2)
    out[pos] = torch.randint(0, VOCAB, (pos.numel(),), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(out, c)
    return out


def close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=ATOL, atol=ATOL)


@pytest.fixture(params=["llada", "dream"])
def model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


# ---------------------------------------------------------------- (a) unchanged canvas == exact
@pytest.mark.parametrize("backend", ["dense", "sparsed"])
def test_cached_step_on_unchanged_canvas_equals_exact(model_dir, backend):
    """On the refresh's own canvas a cached step reproduces the exact forward at its span, for every
    phase pair the schedule produces (dense; after the selection, sparse refresh and sparse cached),
    and a refresh's logits are exact mode's."""
    rig = Rig(_worker(model_dir, backend), backend)
    c = [canvas(i) for i in range(2)]
    phases = (DENSE, SPARSE) if rig.sparsed else (DENSE,)
    for phase in phases:
        if phase == SPARSE:
            rig.run(*[rig.row(i, c[i], SELECT, "refresh") for i in range(2)])
        exact = rig.run(*[rig.row(i, c[i], phase, "exact") for i in range(2)])
        close(rig.run(*[rig.row(i, c[i], phase, "refresh") for i in range(2)]), exact)
        for mode in ("dual", "prefix"):
            close(rig.run(*[rig.row(i, c[i], phase, "cached", mode) for i in range(2)]), exact)


# ---------------------------------------------------------------- (b) the semantics restated
class Restated(AttentionBackend):
    """KV.md's cached step in plain torch, one row: a whole-row pass records every layer's K/V; a
    cached pass (metadata = the span) replaces the span's K/V in a copy of the record and attends
    over all of it. `tiles` (per layer, bool [H, nb, nb]) restricts each query at canvas position p
    to the kept key blocks of its query block p // BS."""
    name = "restated"

    def __init__(self, layout):
        super().__init__(layout, torch.device("cpu"), torch.float32)
        self.k, self.v, self.tiles = {}, {}, None

    def build_metadata(self, rows):
        return rows[0].computed

    def forward(self, q, k, v, span, layer):
        if span is None:
            self.k[layer], self.v[layer] = k.clone(), v.clone()
            keys, values, qpos = k, v, torch.arange(k.shape[0])
        else:
            keys, values = self.k[layer].clone(), self.v[layer].clone()
            keys[span[0]:span[1]], values[span[0]:span[1]] = k, v
            qpos = torch.arange(*span)
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * self.layout.scale
        if self.tiles is not None:
            kblock = torch.arange(keys.shape[0]) // BS
            allowed = self.tiles[layer][:, qpos // BS][:, :, kblock]          # [H, q, k]
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def restated_logits(model, backend: Restated, i: int, c: torch.Tensor, span, tiles) -> torch.Tensor:
    n, p = ROWS[i]
    s, e = span or (0, n)
    backend.tiles = tiles
    with torch.inference_mode():
        hidden = model(c[s:e], torch.arange(s, e), backend.build_metadata([RowSpec(n, p, computed=span)]))
        return model.compute_logits(hidden, torch.arange(*_block(i)) - s)


@pytest.mark.parametrize("mode", ["dual", "prefix"])
@pytest.mark.parametrize("backend", ["dense", "sparsed"])
def test_cached_step_after_changes_equals_restatement(model_dir, backend, mode):
    """Tokens changed inside the span since the refresh: keys/values outside the span are the
    refresh canvas's, inside the new canvas's; dense before the selection, then the stored pattern
    (refreshed by a selecting pass, then by a sparse one)."""
    rig = Rig(_worker(model_dir, backend), backend)
    ref = Restated(rig.w.backend.layout)
    model = load_model(read_model_info(model_dir), ref, torch.float32, "cpu")
    old = [canvas(i) for i in range(2)]
    new = [changed(old[i], rig.span(i, mode)) for i in range(2)]
    # (refresh phase, cached phase): dense; select then sparse; sparse then sparse
    pairs = [(DENSE, DENSE)] + ([(SELECT, SPARSE), (SPARSE, SPARSE)] if rig.sparsed else [])
    for refresh_phase, cached_phase in pairs:
        rig.run(*[rig.row(i, old[i], refresh_phase, "refresh") for i in range(2)])
        got = rig.run(*[rig.row(i, new[i], cached_phase, "cached", mode) for i in range(2)])
        for i in range(2):
            tiles = rig.tiles(i) if cached_phase == SPARSE else None
            restated_logits(model, ref, i, old[i], None, tiles if refresh_phase == SPARSE else None)
            want = restated_logits(model, ref, i, new[i], rig.span(i, mode), tiles)
            torch.testing.assert_close(got[i], want, rtol=ATOL, atol=ATOL)
            assert not torch.allclose(got[i], restated_logits(model, ref, i, new[i], None, tiles), atol=1e-3), \
                "the cached step must differ from a full pass on the new canvas (the test needs stale keys)"


# ---------------------------------------------------------------- (c) mixed batches
def _mixed_rows(rig: Rig, mode: str) -> list[RowInput]:
    """Row order [cached, exact, cached, refresh, cached]: neither the stored tokens nor the cached
    rows of one call lie back to back in the packed batch. SparseD (after selecting every row):
    row 2 is cached in its dense phase, the others sparse."""
    sparse = SPARSE if rig.sparsed else DENSE
    new = [changed(canvas(i), rig.span(i, mode)) for i in range(len(ROWS))]
    return [rig.row(0, new[0], sparse, "cached", mode), rig.row(1, canvas(1), sparse, "exact"),
            rig.row(2, new[2], DENSE, "cached", mode), rig.row(3, canvas(3), sparse, "refresh"),
            rig.row(4, new[4], sparse, "cached", mode)]


@pytest.mark.parametrize("backend", ["dense", "sparsed"])
def test_rows_with_and_without_cache_in_one_step_equal_alone(model_dir, backend):
    rig = Rig(_worker(model_dir, backend), backend)
    for mode in ("dual", "prefix"):
        first = SELECT if rig.sparsed else DENSE
        rig.run(*[rig.row(i, canvas(i), DENSE if i == 2 else first, "refresh") for i in range(len(ROWS))])
        rows = _mixed_rows(rig, mode)
        alone = [rig.run(r)[0] for r in rows]
        close(rig.run(*rows), alone)
        close(rig.run(*rows[::-1]), alone[::-1])


# ---------------------------------------------------------------- planning errors
def test_bad_cache_plans_fail_before_work(tiny_llada_dir, tiny_dream_dir):
    rig = Rig(_worker(tiny_llada_dir, "sparsed"), "sparsed")
    c = canvas(0)
    cached_select = rig.row(0, c, SELECT, "cached")
    with pytest.raises(ValueError, match=r"row 0: phase 'select' on a cached step \(computed=\(28, 36\)\)"):
        rig.run(cached_select)
    no_pages = rig.row(0, c, DENSE, "cached")
    no_pages.spec = RowSpec(37, 20, computed=(28, 36))
    with pytest.raises(ValueError, match=r"row 0: RowSpec.computed=\(28, 36\) needs kv_pages"):
        rig.run(no_pages)
    short = RowInput(c, torch.arange(28, 36), RowSpec(37, 20, kv_pages=(1, 2, 3), computed=(28, 36)))
    with pytest.raises(ValueError, match="row 0: 3 kv_pages of 8 tokens cannot hold its 37 canvas positions"):
        rig.run(short)
    bad_page = RowInput(c, torch.arange(28, 36), RowSpec(37, 20, kv_pages=(0, 1, 2, 3, NUM_PAGES)))
    with pytest.raises(ValueError, match=f"outside the pool's {NUM_PAGES} pages"):
        rig.run(bad_page)
    fresh = _worker(tiny_llada_dir, "dense")
    with pytest.raises(ValueError, match="KV pool was never allocated"):
        fresh.execute(StepInput([rig.row(0, c, DENSE, "refresh")]))
    # Dream reads the logit of position i from hidden row i - 1: a span starting at the first wanted
    # position lacks that row
    dream = Rig(_worker(tiny_dream_dir, "dense"), "dense")
    late = dream.row(0, c, DENSE, "cached")
    late.spec = RowSpec(37, 20, kv_pages=dream.pages[0], computed=(28, 36))
    with pytest.raises(ValueError, match=r"row 0: logits positions 28..35 need hidden rows 27..34, outside "
                                         r"the computed span \(28, 36\) \(logits_shift=1"):
        dream.run(late)


# ---------------------------------------------------------------- (d) sequence parallelism
SP = 2


def _sp_sequence(rig: Rig) -> list[list[torch.Tensor]]:
    """Refreshes and cached steps through every phase, with exact rows mixed in."""
    out, mode = [], "dual"
    phases = [(DENSE, DENSE), (SELECT, SPARSE), (SPARSE, SPARSE)] if rig.sparsed else [(DENSE, DENSE)]
    for refresh_phase, cached_phase in phases:
        out.append(rig.run(*[rig.row(i, canvas(i), refresh_phase, "refresh") for i in range(3)]))
        new = [changed(canvas(i), rig.span(i, mode)) for i in range(3)]
        out.append(rig.run(rig.row(0, new[0], cached_phase, "cached", mode),
                           rig.row(1, canvas(1), cached_phase, "exact"),
                           rig.row(2, new[2], cached_phase, "cached", "prefix")))
    return out


def _sp_rank(rank: int, ports: list[int], cases: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    for i, ((model_dir, backend), port) in enumerate(zip(cases, ports)):
        config = WorkerConfig(str(model_dir), torch.float32, "cpu", backend, sequence_parallel_size=SP)
        worker = Worker(config, DistributedInit(rank, f"tcp://127.0.0.1:{port}"))
        torch.save(_sp_sequence(Rig(worker, backend)), os.path.join(out_dir, f"{i}-{rank}.pt"))
        worker.close()


def test_sequence_parallel_cached_steps_equal_one_rank(tmp_path, tiny_llada_dir, tiny_dream_dir):
    """Each rank stores and reads the K/V of its own heads (Dream: 2 KV heads, one per rank; with a
    single KV head, both ranks cache a copy of it)."""
    dream_1kv = write_tiny_dream(tmp_path / "dream_1kv", num_key_value_heads=1)
    cases = [(tiny_llada_dir, "sparsed"), (tiny_dream_dir, "sparsed"), (tiny_dream_dir, "dense"),
             (dream_1kv, "sparsed")]
    mp.spawn(_sp_rank, args=(free_ports(len(cases)), cases, str(tmp_path)), nprocs=SP)
    for i, (model_dir, backend) in enumerate(cases):
        want = _sp_sequence(Rig(_worker(model_dir, backend), backend))
        got = torch.load(tmp_path / f"{i}-0.pt")
        assert torch.load(tmp_path / f"{i}-1.pt") == [None] * len(want)
        for g, w in zip(got, want):
            close(g, w)
