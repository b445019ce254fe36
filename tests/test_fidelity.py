"""The fidelity harness (sparsed_engine/evaluation) end to end at a tiny scale, its measures, its
statistics, and its ablation and probe backends."""
import math

import pytest
import torch

from attention_backends.base import SELECT, SPARSE, AttentionLayout, PoolSpec, RowSpec
from attention_backends.registry import installed_backends
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from sparsed_engine.evaluation import ablations as fidelity_backends
from sparsed_engine.evaluation.ablations import SlidingWindowBackend, SparseFromStep0Backend
from sparsed_engine.evaluation.fidelity import ROUNDING_BASELINE, Scale, Setting, passkey_prompts, run, sparsed, table
from sparsed_engine.evaluation.heldout import heldout_stream
from sparsed_engine.evaluation.measures import (dense_trajectory, free_running_agreement, make_llm, masked_nll,
                                                nested_order, teacher_forced_agreement)
from sparsed_engine.evaluation.stats import accuracy_cell, mcnemar_p, mean_interval, wilson, within_points
from model_executor.model_loader import load_tokenizer

TINY = Scale(passkey_lengths=(128,), passkey_samples=2, passkey_gen=8, nll_length=128, nll_docs=2,
             agree_lengths=(128,), agree_prompts=2, agree_gen=8, agree_block=8,
             settings=[Setting("dense", "dense"), ROUNDING_BASELINE, sparsed(0.2, 0.3, 32),
                       Setting("step0", "sparsed_step0", {"select": 0.3, "block_size": 32}),
                       Setting("window", "sparsed_window", {"select": 0.3, "block_size": 32})])


def test_harness_runs_every_measure(tiny_llada_dir):
    results = run(str(tiny_llada_dir), TINY, "cpu")
    assert list(results) == [s.label for s in TINY.settings]
    assert results["dense"]["agree"] == {128: 1.0}  # dense against itself
    for r in results.values():
        assert set(r["nll"]) == {0.3, 0.6, 0.9}
        assert all(math.isfinite(v) and v > 0 for v in r["nll"].values())
        assert all(0 <= a <= 1 for a in list(r["passkey"].values()) + list(r["agree"].values()))
        assert set(r["passkey_depth"][128]) == {"start", "end"}      # two prompts: depths 0.25, 0.75
        assert 0 <= r["agree_tf"][128] <= 1 and r["kl_tf"][128] > -1e-6
    assert results["dense"]["agree_tf"] == {128: 1.0}
    md = table(results)
    assert all(f"| {s.label} |" in md for s in TINY.settings) and "(+0.00%)" in md


def test_passkey_prompts_have_the_exact_length_and_the_needle(tiny_llada_dir):
    tok = load_tokenizer(tiny_llada_dir)
    stream = heldout_stream(tok, max_chars=50_000)
    prompts = passkey_prompts(tok, stream, 200, 4, 8, seed=0)
    assert len({key for _, key in prompts}) == 4
    for ids, key in prompts:
        assert len(ids) == 200 - 8
        text = tok.decode(ids)
        assert f"The pass key is {key}. Remember it." in text and text.endswith("The pass key is")


def test_ablations_register_through_entry_points():
    fidelity_backends.register()
    assert {"sparsed_step0", "sparsed_window"} <= set(installed_backends())
    cfg = SparseDConfig(skip=0.5)
    assert [SparseFromStep0Backend.phase(s, 8, cfg) for s in range(3)] == [SELECT, SPARSE, SPARSE]


def _pattern(cls, q, k, v, cfg):
    layout = AttentionLayout(num_layers=1, num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2],
                             scale=q.shape[2] ** -0.5)
    backend = cls(layout, "cpu", torch.float32)
    backend.init_pool(PoolSpec(num_blocks=4, block_bytes=64))
    meta = backend.build_metadata([RowSpec(len(q), 200, SELECT, (0,), cfg)])
    backend.forward(q, k, v, meta, 0)
    return backend.load_tiles(meta.rows[0], 0)


@pytest.mark.parametrize("select", [0.1, 0.3, 0.6])
def test_window_keeps_sparsed_density_as_a_band(select):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(256, 2, 16, generator=g) for _ in range(3))
    cfg = SparseDConfig(select=select, block_size=32)
    sparse, window = _pattern(SparseDBackend, q, k, v, cfg), _pattern(SlidingWindowBackend, q, k, v, cfg)
    assert torch.equal(sparse.sum(-1), window.sum(-1))
    idx = torch.arange(window.shape[-1])
    for h in range(window.shape[0]):
        for i in range(window.shape[1]):
            kept = idx[window[h, i]]
            assert kept.min() <= i <= kept.max() and len(kept) == kept.max() - kept.min() + 1


def test_nll_follows_the_generation_schedule(tiny_llada_dir):
    """The pattern is chosen at the setting's own selection step of a nested schedule: ratios the
    schedule reaches before it are dense, `skip` moves the selection canvas, step 0 differs."""
    fidelity_backends.register()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 200, (128,), generator=g).tolist() for _ in range(2)]
    cfg = {"select": 0.3, "block_size": 16}
    nll = {}
    for s in [Setting("dense", "dense"), Setting("s0.2", "sparsed", {**cfg, "skip": 0.2}),
              Setting("s0.5", "sparsed", {**cfg, "skip": 0.5}), Setting("step0", "sparsed_step0", cfg)]:
        llm = make_llm(str(tiny_llada_dir), s, "cpu", 256)
        density = {}
        nll[s.label] = [masked_nll(llm, s, docs, r, seed=3, steps=64, density=density) for r in (0.3, 0.6, 0.9)]
        assert s.label == "dense" or 0 < density["density"] < 1
    # ratio 0.9 is step 6 of 64: before SparseD's selection (step 13 at skip 0.2), after step 0
    assert nll["s0.2"][2] == nll["dense"][2] and nll["step0"][2] != nll["dense"][2]
    assert nll["s0.5"][1] == nll["dense"][1]        # ratio 0.6 is step 25, selection at 33
    assert nll["s0.2"][0] != nll["s0.5"][0] != nll["dense"][0]


def test_nested_masking_is_nested():
    rank = nested_order(50, seed=1)
    assert sorted(rank.tolist()) == list(range(50))
    masked = [set((rank < round(r * 50)).nonzero().flatten().tolist()) for r in (0.3, 0.6, 0.9)]
    assert masked[0] < masked[1] < masked[2]


def test_teacher_forced_agreement(tiny_llada_dir):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (96,), generator=g).tolist() for _ in range(2)]
    dense = make_llm(str(tiny_llada_dir), Setting("dense", "dense"), "cpu", 256)
    traj = dense_trajectory(dense, prompts, gen=32, block=16, steps=16)
    assert len(traj.canvases) == 16 and all(len(c) == 2 for c in traj.committed)
    assert sum(len(c) for step in traj.committed for c in step) == 2 * 32   # every position once
    top1, kl = teacher_forced_agreement(dense, Setting("dense", "dense"), traj)
    assert top1 == 1.0 and abs(kl) < 1e-5
    s = Setting("s", "sparsed", {"skip": 0.2, "select": 0.3, "block_size": 16})
    top1, kl = teacher_forced_agreement(make_llm(str(tiny_llada_dir), s, "cpu", 256), s, traj)
    assert 0 <= top1 < 1 and kl > 0
    with pytest.raises(ValueError, match="gen=30"):
        dense_trajectory(dense, prompts, gen=30, block=16, steps=16)


def test_free_running_agreement_does_not_count_shared_padding():
    eos = 9
    assert free_running_agreement([[1, 2, 9, 9]], [[1, 3, 9, 9]], eos) == 0.5
    assert free_running_agreement([[1, 2, 9, 9]], [[1, 2, 5, 9]], eos) == 2 / 3
    assert free_running_agreement([[9, 9]], [[9, 9]], eos) == 1.0


def test_statistics():
    lo, hi = wilson(0, 10)
    assert lo == 0 and 0.27 < hi < 0.29            # the Wilson bound at 0/10
    lo, hi = wilson(98, 100)
    assert 0.92 < lo < 0.94 and 0.99 < hi < 1.0
    assert accuracy_cell([True] * 3 + [False]) == "75.0% [30.1, 95.4]"
    a = [True] * 100
    b = [True] * 90 + [False] * 10                  # 10 discordant pairs, all one way
    assert mcnemar_p(a, b) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_p(a, a) == 1.0
    assert within_points(a, b) == "no"
    assert within_points(a, [True] * 99 + [False]) == "yes"
    assert within_points(a[:20], [True] * 18 + [False] * 2) == "undecided"   # 10 points, 2 prompts
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_p(a, b[:5])
    lo, hi = mean_interval([0.0, 1.0] * 50)
    assert lo == pytest.approx(0.5 - 1.96 * (0.25 * 100 / 99) ** 0.5 / 10) and hi == pytest.approx(1 - lo)
