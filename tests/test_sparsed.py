"""SparseD backend: selection semantics, the pattern's life in the pool, and end-to-end equality."""
import math

import pytest
import torch

from attention_backends.base import DENSE, SELECT, SPARSE, AttentionLayout, PoolSpec, RowSpec
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from sparsed_engine import LLM, SamplingParams
from tests.admission import second_waits_then_both_finish


def naive_importance(q, k, prompt_len, bs, scale):
    """Per head and query block: (importance over all key blocks, importance over the generation
    key blocks under their own softmax), as lists of floats, and g."""
    L, H, _ = q.shape
    kx = k.repeat_interleave(H // k.shape[1], dim=1)
    nb = math.ceil(L / bs)
    g = min(math.ceil(prompt_len / bs), nb - 1)
    out = {}
    for h in range(H):
        s = (q[:, h].double() @ kx[:, h].double().T) * scale
        p_all = torch.softmax(s, -1)
        p_gen = torch.softmax(s[:, g * bs:], -1)
        for i in range(nb):
            rows = slice(i * bs, (i + 1) * bs)
            imp = [float(p_all[rows, j * bs:(j + 1) * bs].sum()) / bs**2 for j in range(nb)]
            impg = [float(p_gen[rows, (j - g) * bs:(j - g + 1) * bs].sum()) / bs**2 for j in range(g, nb)]
            out[h, i] = (imp, impg)
    return out, nb, g


def naive_keep(q, k, prompt_len, bs, scale, count):
    """The union of the two regions' choices; count(importances) says how many of a region's
    blocks (in importance order) to keep."""
    imps, nb, g = naive_importance(q, k, prompt_len, bs, scale)
    keep = torch.zeros(q.shape[1], nb, nb, dtype=torch.bool)
    for (h, i), (imp, impg) in imps.items():
        for j in sorted(range(nb), key=lambda j: -imp[j])[:count(imp)]:
            if j < g:
                keep[h, i, j] = True
        for jj in sorted(range(nb - g), key=lambda j: -impg[j])[:count(impg)]:
            keep[h, i, g + jj] = True
    return keep


def naive_select(q, k, prompt_len, bs, select, scale):
    """Straight from the definition: full softmax, tile means, per-region top-k, union."""
    return naive_keep(q, k, prompt_len, bs, scale, lambda imp: min(int(len(imp) * select) + 1, len(imp)))


def naive_select_mass(q, k, prompt_len, bs, mass, lo, hi, scale):
    """Adaptive selection from its definition: the fewest blocks (largest first) whose importance
    reaches mass x the region row's total, at least int(n*lo)+1 and at most int(n*hi)+1 (<= n)."""
    def count(imp):
        n, acc, need = len(imp), 0.0, 0
        for v in sorted(imp, reverse=True):
            acc += v
            need += 1
            if acc >= mass * sum(imp):
                break
        return max(min(int(n * lo) + 1, n), min(need, int(n * hi) + 1, n))
    return naive_keep(q, k, prompt_len, bs, scale, count)


def _backend(heads=4, kv_heads=2, d=16, layers=1, pool_blocks=64):
    lay = AttentionLayout(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                          scale=d ** -0.5, total_heads=heads)
    b = SparseDBackend(lay, torch.device("cpu"), torch.float32)
    b.init_pool(PoolSpec(pool_blocks, 256))
    return b


@pytest.mark.parametrize("L,P,bs", [(70, 40, 16), (100, 90, 16), (45, 44, 16), (64, 16, 32), (33, 10, 16)])
@pytest.mark.parametrize("scale_kind", ["head_dim", "num_heads"])
def test_selection_matches_definition(L, P, bs, scale_kind):
    torch.manual_seed(L * 7 + P)
    b = _backend()
    q, k = torch.randn(L, 4, 16) * 2, torch.randn(L, 2, 16) * 2
    cfg = SparseDConfig(select=0.3, block_size=bs, selection_scale=scale_kind)
    nb = math.ceil(L / bs)
    meta = b.build_metadata([RowSpec(L, P, SELECT, tuple(range(4 * nb * nb // 256 + 1)), cfg)])
    v = torch.randn(L, 2, 16)
    b.forward(q, k, v, meta, 0)
    scale = 16 ** -0.5 if scale_kind == "head_dim" else 4 ** -0.5
    assert torch.equal(b.load_tiles(meta.rows[0], 0), naive_select(q, k, P, bs, 0.3, scale))


def _select_pattern(cfg, L, P, seed):
    torch.manual_seed(seed)
    b = _backend()
    q, k, v = torch.randn(L, 4, 16) * 2, torch.randn(L, 2, 16) * 2, torch.randn(L, 2, 16)
    nb = math.ceil(L / cfg.block_size)
    meta = b.build_metadata([RowSpec(L, P, SELECT, tuple(range(4 * nb * nb // 256 + 1)), cfg)])
    b.forward(q, k, v, meta, 0)
    return q, k, b.load_tiles(meta.rows[0], 0)


@pytest.mark.parametrize("L,P,bs", [(70, 40, 16), (100, 90, 16), (160, 60, 16), (64, 16, 32)])
@pytest.mark.parametrize("mass", [0.5, 0.9, 0.98, 1.0])
@pytest.mark.parametrize("bounds", [(None, None), (0.2, 0.6), (0.0, 0.1)])
def test_adaptive_selection_matches_definition(L, P, bs, mass, bounds):
    cfg = SparseDConfig(block_size=bs, mass=mass, min_select=bounds[0], max_select=bounds[1],
                        selection_scale="head_dim")
    q, k, tiles = _select_pattern(cfg, L, P, seed=L + int(mass * 100))
    lo, hi = cfg.select_bounds
    assert torch.equal(tiles, naive_select_mass(q, k, P, bs, mass, lo, hi, 16 ** -0.5))


def test_adaptive_keeps_fewer_tiles_at_lower_mass_and_equals_select_at_fixed_bounds():
    kept = [int(_select_pattern(SparseDConfig(block_size=16, mass=m), 160, 60, seed=1)[2].sum())
            for m in (0.5, 0.9, 0.99)]
    assert kept[0] < kept[1] < kept[2]
    # min_select = max_select = s pins every count to select=s's top-k
    fixed = _select_pattern(SparseDConfig(block_size=16, mass=0.5, min_select=0.3, max_select=0.3), 160, 60, 2)[2]
    assert torch.equal(fixed, _select_pattern(SparseDConfig(block_size=16, select=0.3), 160, 60, 2)[2])


@pytest.mark.parametrize("cfg,needle", [({"mass": 0}, "'mass'\\]=0"), ({"mass": 1.5}, "mass"),
                                        ({"mass": "0.9"}, "mass"), ({"min_select": 0.1}, "min_select.*set 'mass'"),
                                        ({"max_select": 0.5}, "max_select"),
                                        ({"mass": 0.9, "max_select": 2}, "max_select"),
                                        ({"mass": 0.9, "min_select": 0.5, "max_select": 0.2},
                                         "min_select'\\]=0.5 exceeds .*max_select'\\]=0.2")])
def test_adaptive_config_errors(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        SparseDBackend.resolve_config(cfg)


def test_default_selection_scale_follows_the_family(tiny_llada_dir, tiny_dream_dir):
    from model_executor.model_loader import read_model_info
    assert read_model_info(tiny_llada_dir).attention_layout.selection_scale == "num_heads"
    assert read_model_info(tiny_dream_dir).attention_layout.selection_scale == "head_dim"
    lay = AttentionLayout(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25,
                          total_heads=4, selection_scale="num_heads")
    b = SparseDBackend(lay, torch.device("cpu"), torch.float32)
    assert b.selection_scale(SparseDConfig()) == "num_heads"
    assert b.selection_scale(SparseDConfig(selection_scale="head_dim")) == "head_dim"


def test_sparse_forward_is_dense_attention_on_kept_tiles():
    torch.manual_seed(0)
    b = _backend(layers=2)
    L, P, bs = 75, 50, 16
    nb = math.ceil(L / bs)
    cfg = SparseDConfig(select=0.2, block_size=bs)
    per_layer = -(-4 * nb * -(-nb // 8) // 256)
    blocks = tuple(range(2 * per_layer))
    q, k, v = torch.randn(L, 4, 16), torch.randn(L, 2, 16), torch.randn(L, 2, 16)
    b.forward(q, k, v, b.build_metadata([RowSpec(L, P, SELECT, blocks, cfg)]), 1)
    meta = b.build_metadata([RowSpec(L, P, SPARSE, blocks, cfg)])
    out = b.forward(q, k, v, meta, 1)
    tiles = b.load_tiles(meta.rows[0], 1)
    assert not tiles.all()
    tok = tiles.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :L, :L]
    kx, vx = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kx.double()) * 16 ** -0.5
    p = torch.softmax(s.masked_fill(~tok, -float("inf")), -1)
    expect = torch.einsum("hqk,khd->qhd", p, vx.double())
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def test_phases_follow_the_schedule():
    cfg = SparseDConfig(skip=0.2)
    phases = [SparseDBackend.phase(i, 20, cfg) for i in range(20)]
    assert phases[:5] == [DENSE] * 5 and phases[5] == SELECT and set(phases[6:]) == {SPARSE}


def test_llada8b_64k_pattern_fits_64mb():
    lay = AttentionLayout(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, scale=128 ** -0.5)
    n = SparseDBackend.pattern_blocks_needed(lay, 65536, SparseDConfig(), 1 << 16, 1024)
    assert n * (1 << 16) <= 64 * 2**20


@pytest.mark.parametrize("key,value,needle", [("skip", 1.5, "skip"), ("select", 0, "select"),
                                              ("block_size", 48, "block_size"),
                                              ("selection_scale", "x", "selection_scale"),
                                              ("sparsity", 0.1, "unknown SparseD")])
def test_config_errors(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        SparseDBackend.resolve_config({key: value})


SPARSE_CFG = {"block_size": 16, "skip": 0.2, "select": 0.3}


@pytest.fixture(scope="module", params=["llada", "dream"])
def engines(request, tiny_llada_dir, tiny_dream_dir):
    d = str(tiny_llada_dir if request.param == "llada" else tiny_dream_dir)
    return (LLM(model=d), LLM(model=d, attention_backend="sparsed", attention_config=SPARSE_CFG,
                              mask_pool_bytes=1 << 20))


PROMPT = "The scheduler decides which sequences run in the next step. " * 3


def test_full_density_equals_dense(engines):
    dense, _ = engines
    p = SamplingParams(max_tokens=32, steps=16, block_length=16)
    expect = dense.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids
    for cfg in ({"select": 1.0}, {"skip": 1.0}):
        llm = LLM(model=str(dense.llm_engine.config.model), attention_backend="sparsed",
                  attention_config={**SPARSE_CFG, **cfg}, mask_pool_bytes=1 << 20)
        assert llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids == expect


def test_pattern_selected_once_and_read_every_later_step(engines, monkeypatch):
    _, sparse = engines
    backend = sparse.llm_engine.executor.worker.backend
    layers = backend.layout.num_layers
    calls = {"choose": 0, "load": 0}
    for name, key in (("_choose", "choose"), ("load_bits", "load")):
        orig = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _o=orig, _k=key: (calls.__setitem__(_k, calls[_k] + 1), _o(*a))[1])
    out = sparse.generate(PROMPT, SamplingParams(max_tokens=32, steps=20, block_length=32), use_tqdm=False)
    select_at = SparseDConfig(**SPARSE_CFG).select_step(20)
    assert calls["choose"] == layers
    assert calls["load"] == layers * (20 - select_at - 1)
    assert out[0].metrics.steps == 20


def test_adaptive_generation_runs(engines):
    dense, _ = engines
    p = SamplingParams(max_tokens=32, steps=16, block_length=16)
    llm = LLM(model=str(dense.llm_engine.config.model), attention_backend="sparsed",
              attention_config={**SPARSE_CFG, "mass": 0.9, "max_select": 0.6}, mask_pool_bytes=1 << 20)
    out = llm.generate([PROMPT, "Hello"], p, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in out)
    # min_select 1 keeps every tile whatever the mass: exactly dense, no pattern
    full = LLM(model=str(dense.llm_engine.config.model), attention_backend="sparsed",
               attention_config={**SPARSE_CFG, "mass": 1.0, "min_select": 1.0}, mask_pool_bytes=1 << 20)
    expect = dense.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids
    assert full.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids == expect


def test_pool_empties_after_finish_and_abort(engines):
    _, sparse = engines
    eng = sparse.llm_engine
    sparse.generate([PROMPT, "Hi"], SamplingParams(max_tokens=16, steps=8), use_tqdm=False)
    assert eng.get_stats()["mask_pool"]["used_blocks"] == 0
    rid = eng.add_request(PROMPT, SamplingParams(max_tokens=16, steps=8))
    for _ in range(4):
        eng.step()
    stats = eng.get_stats()["mask_pool"]
    assert stats["used_blocks"] > 0
    assert eng.abort_request(rid).outputs[0].finish_reason == "abort"
    stats = eng.get_stats()["mask_pool"]
    assert stats["used_blocks"] == 0 and stats["reserved_blocks"] == 0
    assert not eng.has_unfinished_requests()


def test_mixed_batch_equals_alone(engines):
    _, sparse = engines
    prompts = [PROMPT, "Hello world", PROMPT + "Two plus two", "The cat"]
    params = [SamplingParams(max_tokens=32, steps=16, block_length=16),
              SamplingParams(max_tokens=16, steps=16, attention_config={"skip": 0.9}),  # dense longer
              SamplingParams(max_tokens=16, steps=8, attention_config={"block_size": 32, "select": 0.5}),
              SamplingParams(max_tokens=8, steps=8, cfg_scale=1.0, temperature=0.5, seed=3)]
    batched = sparse.generate(prompts, params, use_tqdm=False)
    alone = [sparse.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]


def test_pool_full_waits_then_runs(tiny_llada_dir):
    small = dict(attention_backend="sparsed", attention_config=SPARSE_CFG, mask_pool_block_bytes=16)
    probe = LLM(model=str(tiny_llada_dir), mask_pool_bytes=1 << 20, **small)
    p = SamplingParams(max_tokens=32, steps=8)
    need = probe.llm_engine.make_sequence(PROMPT, p).pattern_blocks_needed
    llm = LLM(model=str(tiny_llada_dir), mask_pool_bytes=need * 16, **small)
    eng = llm.llm_engine
    second_waits_then_both_finish(eng, PROMPT, p)
    with pytest.raises(ValueError, match="pattern needs .* raise LLM\\(mask_pool_bytes"):
        llm.generate(PROMPT * 4, SamplingParams(max_tokens=64, steps=8), use_tqdm=False)
