"""The fidelity harness (benchmarks/fidelity.py) end to end at a tiny scale, and its two ablation backends."""
import math

import pytest
import torch

from attention_backends.base import SELECT, SPARSE, AttentionLayout, PoolSpec, RowSpec
from attention_backends.registry import installed_backends
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from benchmarks import fidelity_backends
from benchmarks.fidelity import ROUNDING_BASELINE, Scale, Setting, heldout_stream, passkey_prompts, run, sparsed, table
from benchmarks.fidelity_backends import SlidingWindowBackend, SparseFromStep0Backend
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
