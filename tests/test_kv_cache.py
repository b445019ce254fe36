"""Throughput mode (KV cache, Fast-dLLM v1's block-wise prefix / dual cache), engine side: cache mode
equals exact mode when every step is a refresh, a whole cached generation equals a plain-torch
restatement of the semantics written here (no pool, no kernels), batching, the page pool's life,
refusals and the options."""
import contextlib
import math

import pytest
import torch

from attention_backends.base import DENSE, SELECT, SPARSE, AttentionBackend
from attention_backends.ops.block_importance_ref import block_importance_ref
from attention_backends.sparsed import SparseDConfig
from attention_backends.sparsed_pattern import generation_block, select_tiles
from model_executor.step_input import RequestSampling
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.config import EngineConfig
from tests.admission import second_waits_then_both_finish

KV_BYTES = 4 << 20
SPARSE_CFG = {"block_size": 16, "skip": 0.3, "select": 0.3}
PROMPT = "The scheduler decides which sequences run in the next step. " * 2


def _engine(model_dir, sparse: bool, **kw) -> LLM:
    # float32 everywhere: on a GPU the kernels run compiled (fp32 dots at IEEE precision), and
    # token-for-token comparisons with the torch restatement must not hinge on bf16 near-ties
    extra = dict(attention_backend="sparsed", attention_config=SPARSE_CFG, mask_pool_bytes=1 << 20) if sparse else {}
    return LLM(model=str(model_dir), kv_cache_bytes=KV_BYTES, dtype="float32", **extra, **kw)


@pytest.fixture(scope="module", params=[("llada", False), ("llada", True), ("dream", False), ("dream", True)],
                ids=["llada-dense", "llada-sparsed", "dream-dense", "dream-sparsed"])
def llm(request, tiny_llada_dir, tiny_dream_dir):
    family, sparse = request.param
    with _engine(tiny_llada_dir if family == "llada" else tiny_dream_dir, sparse) as engine:
        yield engine


@pytest.fixture(scope="module", params=[("llada", True), ("dream", False)], ids=["llada-sparsed", "dream-dense"])
def mixed_llm(request, tiny_llada_dir, tiny_dream_dir):
    """Fewer engines for the costlier batch tests: both families, both backends."""
    family, sparse = request.param
    with _engine(tiny_llada_dir if family == "llada" else tiny_dream_dir, sparse) as engine:
        yield engine


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_pools_empty(llm):
    stats = llm.llm_engine.get_stats()
    for pool in ("kv_pool", "mask_pool"):
        assert stats[pool]["used_blocks"] == 0 and stats[pool]["reserved_blocks"] == 0, stats
    assert not llm.llm_engine.has_unfinished_requests()


# ---------------------------------------------------------------- the restatement
class _Restated(AttentionBackend):
    """KV.md in plain torch, one row. A refresh (span None) records every layer's K/V of the whole
    canvas; a cached step's span (s, e) writes its fresh K/V over the record, and its queries attend
    to the record (fresh inside the span, from the refresh elsewhere). SELECT chooses the pattern with
    the torch reference functions; SPARSE masks each query to the kept tiles of its query block."""
    name = "restated"

    def __init__(self, layout, prompt_len: int, canvas_len: int, cfg: SparseDConfig | None, device):
        super().__init__(layout, device, torch.float32)
        self.prompt_len, self.canvas_len, self.cfg = prompt_len, canvas_len, cfg
        self.k, self.v, self.keep = {}, {}, {}
        self.span, self.phase = None, DENSE

    def build_metadata(self, rows):
        return None

    def forward(self, q, k, v, metadata, layer):
        s = 0 if self.span is None else self.span[0]
        if self.span is None:
            self.k[layer], self.v[layer] = k.clone(), v.clone()
        else:
            self.k[layer][s:s + q.shape[0]], self.v[layer][s:s + q.shape[0]] = k, v
        keys, values = self.k[layer], self.v[layer]
        if self.phase == SELECT:
            self.keep[layer] = self._select(q, keys)
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * self.layout.scale
        if self.phase == SPARSE:
            bs = self.cfg.block_size
            qb = torch.arange(s, s + q.shape[0], device=q.device) // bs
            kb = torch.arange(self.canvas_len, device=q.device) // bs
            scores = scores.masked_fill(~self.keep[layer][:, qb][:, :, kb], float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.float()).to(q.dtype)

    def _select(self, q, k):
        cfg, lay = self.cfg, self.layout
        scale = lay.scale if (cfg.selection_scale or lay.selection_scale) == "head_dim" else lay.total_heads ** -0.5
        g = generation_block(self.prompt_len, self.canvas_len, cfg.block_size)
        imp_all, imp_gen = block_importance_ref(q, k, scale, cfg.block_size, g)
        return select_tiles(imp_all, imp_gen, g, cfg.select)


@contextlib.contextmanager
def _attending_with(model, backend):
    """The model's attention layers call `backend` instead of the engine's."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]
    saved = [m.backend for m in owners]
    for m in owners:
        m.backend = backend
    try:
        yield
    finally:
        for m, b in zip(owners, saved):
            m.backend = b


@torch.inference_mode()
def restated_generate(llm, prompt: str, params: SamplingParams, mode: str) -> list[int]:
    """A request in throughput mode `mode`, written from the semantics: the first step of a block that
    runs is a refresh over the whole canvas; the others compute the block (dual) or the block and all
    after it (prefix), from `logits_shift` before the block; SparseD selects at the first refresh at or
    after its selection step, is sparse after it and dense before. Tokens are committed by the family's
    own plan and unmasking rule (tested elsewhere), so only the cache is restated here."""
    eng = llm.llm_engine
    model = eng.executor.worker.model
    den, mask = eng.denoiser, eng.info.mask_token_id
    policy = den.resolve_policy(params, eng.info.generation_config)
    dev = next(model.parameters()).device   # the worker's device: on a GPU the engine runs there
    ids = eng.tokenizer.encode(prompt)
    x = torch.tensor(ids + [mask] * params.max_tokens, device=dev)
    P, L, shift = len(ids), x.numel(), model.logits_shift
    cfg = eng.backend_cls.resolve_config(eng.config.attention_config, params.attention_config) \
        if eng.backend_cls.keeps_patterns else None
    sparse = cfg is not None and not cfg.keeps_all and cfg.select_step(params.steps) < params.steps
    rb = _Restated(eng.layout, P, L, cfg, dev)
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    step = block = in_block = 0
    refreshed_block, selected = None, False
    while block < params.num_blocks:
        lo, hi = P + block * params.block_length, P + (block + 1) * params.block_length
        masked = [p for p in range(lo, hi) if x[p] == mask]
        n, prob = den.plan(len(masked), in_block, params, policy)
        refresh = refreshed_block != block
        rb.phase = (SPARSE if selected else
                    SELECT if sparse and refresh and step >= cfg.select_step(params.steps) else DENSE)
        if rb.phase == SELECT or n or prob:   # a step that changes nothing is skipped
            rb.span = None if refresh else (lo - shift, hi if mode == "dual" else L)
            s, e = rb.span or (0, L)
            with _attending_with(model, rb):
                hidden = model(x[s:e], torch.arange(s, e, device=dev), None)
            at = torch.tensor(masked, device=dev)
            logits = model.compute_logits(hidden, at - s).float()
            logits[:, mask] = -float("inf")
            rs = RequestSampling("r", 0, params.seed, policy, n, prob, params.temperature, params.top_p,
                                 params.top_k, params.alg_temp, 0.0, 1, params.threshold)
            idx, tok = den.unmask(logits, rs, gen)
            x[at[idx]] = tok
            refreshed_block = block
            selected = selected or rb.phase == SELECT
        step, in_block = step + 1, in_block + 1
        emptied = policy in den.threshold_policies and not (x[lo:hi] == mask).any()
        if in_block == params.steps_per_block or emptied:
            block, in_block = block + 1, 0
    return x[P:].tolist()


# ---------------------------------------------------------------- equalities
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_step_per_block_equals_exact(llm, mode):
    """Every step is a refresh: the cache is written but never read for a decision."""
    params = [SamplingParams(max_tokens=32, steps=4, block_length=8, seed=0),
              SamplingParams(max_tokens=16, steps=2, block_length=8, seed=1, temperature=0.7)]
    exact = _tokens(llm.generate([PROMPT, "Hello world"], params, use_tqdm=False))
    cached = _tokens(llm.generate([PROMPT, "Hello world"], [p.replace(kv_cache=mode) for p in params],
                                  use_tqdm=False))
    assert cached == exact and all(exact)
    _assert_pools_empty(llm)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_generation_equals_restatement(llm, mode):
    # 4 blocks of 4 steps; SparseD's selection step int(16 * 0.3) + 1 = 5 is a cached step, so the
    # pattern is selected at step 8 (block 2's refresh), cached steps 5-7 stay dense
    params = SamplingParams(max_tokens=32, steps=16, block_length=8, seed=0, kv_cache=mode)
    got = llm.generate([PROMPT], params, use_tqdm=False)[0]
    expect = restated_generate(llm, PROMPT, params, mode)
    assert got.outputs[0].token_ids == expect[:len(got.outputs[0].token_ids)]
    assert got.metrics.steps == 16
    if mode == "dual":   # not vacuous: cached steps read stale keys, so the output is not exact mode's
        exact = llm.generate([PROMPT], params.replace(kv_cache="none"), use_tqdm=False)[0].outputs[0].token_ids
        assert expect[:len(exact)] != exact
    _assert_pools_empty(llm)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_threshold_decoding_with_the_cache(llm, mode):
    """Blocks end early; the next step is the next block's refresh."""
    params = SamplingParams(max_tokens=32, steps=32, block_length=8, seed=0, kv_cache=mode,
                            unmasking="confidence_threshold", threshold=0.3)
    got = llm.generate([PROMPT], params, use_tqdm=False)[0]
    expect = restated_generate(llm, PROMPT, params, mode)
    assert got.outputs[0].token_ids == expect[:len(got.outputs[0].token_ids)]
    assert got.metrics.steps < 32   # the threshold ended blocks early


def test_step_plan(llm, monkeypatch):
    """What the engine sends: the refresh at each block's first step (whole canvas, pages), cached
    steps computing their span, SELECT only on a refresh, exact rows without pages."""
    eng = llm.llm_engine
    seen = []
    execute = eng.executor.execute
    monkeypatch.setattr(eng.executor, "execute",
                        lambda step: (step.rows and seen.append([r.spec for r in step.rows]), execute(step))[1])
    shift = eng.denoiser.logits_shift
    ids = eng.tokenizer.encode(PROMPT)
    P, L = len(ids), len(ids) + 32
    llm.generate([ids, ids], [SamplingParams(max_tokens=32, steps=16, block_length=8, kv_cache="prefix"),
                              SamplingParams(max_tokens=32, steps=16, block_length=8)], use_tqdm=False)
    assert len(seen) == 16
    for step, (cached, exact) in enumerate(seen):
        block, first = divmod(step, 4)
        assert exact.kv_pages == () and exact.computed is None
        assert len(cached.kv_pages) == math.ceil(L / eng.config.kv_cache_page_size)
        assert cached.computed == (None if first == 0 else (P + 8 * block - shift, L))
        assert cached.phase != SELECT or first == 0
    if eng.backend_cls.keeps_patterns:
        assert [s[0].phase for s in seen] == [DENSE] * 8 + [SELECT] + [SPARSE] * 7
        assert [s[1].phase for s in seen] == [DENSE] * 5 + [SELECT] + [SPARSE] * 10


def test_batched_equals_alone_and_pools_empty_after_aborts(mixed_llm):
    llm = mixed_llm
    prompts = [PROMPT, "Hello world", "Two plus two", "The cat", "Two"]
    params = [SamplingParams(max_tokens=16, steps=8, block_length=8, kv_cache="dual"),
              SamplingParams(max_tokens=16, steps=8, block_length=8, kv_cache="prefix"),
              SamplingParams(max_tokens=16, steps=8, block_length=8),                          # exact
              SamplingParams(max_tokens=8, steps=4, block_length=4, cfg_scale=1.0, temperature=0.5, seed=3,
                             kv_cache="dual"),
              SamplingParams(max_tokens=16, steps=16, block_length=8, kv_cache="prefix",
                             unmasking="confidence_threshold", threshold=0.5)]
    batched = _tokens(llm.generate(prompts, params, use_tqdm=False))
    alone = [_tokens(llm.generate(p, sp, use_tqdm=False))[0] for p, sp in zip(prompts, params)]
    assert batched == alone
    _assert_pools_empty(llm)
    eng = llm.llm_engine
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(3):
        eng.step()
    assert eng.get_stats()["kv_pool"]["used_blocks"] > 0
    eng.abort_request(rids[0])
    eng.abort_request(rids[3])
    while eng.has_unfinished_requests():
        eng.step()
    _assert_pools_empty(llm)


# ---------------------------------------------------------------- the pool
def _pages(llm, prompt, params) -> int:
    return llm.llm_engine.make_sequence(prompt, params).kv_pages_needed


def test_pool_full_waits_then_runs_and_too_big_is_refused(tiny_llada_dir):
    p = SamplingParams(max_tokens=32, steps=8, block_length=8, kv_cache="dual")
    with _engine(tiny_llada_dir, False) as probe:
        need = _pages(probe, PROMPT, p)
        page_bytes = probe.llm_engine.scheduler.block_manager.kv.block_bytes
        assert _pages(probe, PROMPT, p.replace(cfg_scale=1.0)) == 2 * need   # a page table per row
        assert _pages(probe, PROMPT, p.replace(kv_cache="none")) == 0
    # the probe's dtype: a page's bytes depend on it (auto is bfloat16 on a GPU, half the probe's page)
    with LLM(model=str(tiny_llada_dir), kv_cache="dual", kv_cache_bytes=need * page_bytes, dtype="float32") as llm:
        eng = llm.llm_engine
        assert eng.get_stats()["kv_pool"]["kv_allocated_bytes"] == need * page_bytes
        second_waits_then_both_finish(eng, PROMPT, p)
        _assert_pools_empty(llm)
        with pytest.raises(ValueError, match=rf"needs {2 * need} KV pages .* holds {need} .*"
                                             rf"raise LLM\(kv_cache_bytes={need * page_bytes}\)"):
            llm.generate(PROMPT, p.replace(cfg_scale=1.0), use_tqdm=False)
        assert llm.generate(PROMPT, p.replace(kv_cache="none"), use_tqdm=False)   # exact needs no pages
        _assert_pools_empty(llm)
    with LLM(model=str(tiny_llada_dir), kv_cache="prefix", kv_cache_memory_fraction=1e-12) as llm:
        with pytest.raises(ValueError, match=r"EngineConfig.kv_cache='prefix'.*holds 0 .*"
                                             r"kv_cache_memory_fraction=1e-12"):
            llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)


def test_engine_default_and_per_request_override(tiny_llada_dir):
    p = SamplingParams(max_tokens=32, steps=16, block_length=8)
    with _engine(tiny_llada_dir, False) as plain, LLM(model=str(tiny_llada_dir), kv_cache="dual",
                                                                      kv_cache_bytes=KV_BYTES) as dual:
        assert dual.llm_engine.scheduler.block_manager.kv_enabled
        exact = plain.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids
        cached = plain.generate(PROMPT, p.replace(kv_cache="dual"), use_tqdm=False)[0].outputs[0].token_ids
        assert cached != exact
        assert dual.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids == cached
        assert dual.generate(PROMPT, p.replace(kv_cache="none"), use_tqdm=False)[0].outputs[0].token_ids == exact
    with LLM(model=str(tiny_llada_dir)) as none:   # exact engine: no pool at all
        assert not none.llm_engine.scheduler.block_manager.kv_enabled
        assert none.get_stats()["kv_pool"]["total_blocks"] == 0
        with pytest.raises(ValueError, match=r"SamplingParams.kv_cache='prefix' needs the KV pool.*"
                                             r"kv_cache='prefix' or 'dual'.*kv_cache_bytes"):
            none.generate(PROMPT, p.replace(kv_cache="prefix"), use_tqdm=False)
        assert not none.llm_engine.has_unfinished_requests()


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("kw,match", [
    (dict(kv_cache="full"), r"EngineConfig.kv_cache='full'"),
    (dict(kv_cache=None), r"EngineConfig.kv_cache=None"),
    (dict(kv_cache_bytes=-1), r"EngineConfig.kv_cache_bytes=-1"),
    (dict(kv_cache_bytes=1.5), r"EngineConfig.kv_cache_bytes=1.5"),
    (dict(kv_cache_memory_fraction=0.0), r"EngineConfig.kv_cache_memory_fraction=0.0"),
    (dict(kv_cache_memory_fraction=1.5), r"EngineConfig.kv_cache_memory_fraction=1.5"),
    (dict(kv_cache_memory_fraction=float("nan")), r"EngineConfig.kv_cache_memory_fraction=nan"),
    (dict(kv_cache_page_size=0), r"EngineConfig.kv_cache_page_size=0"),
])
def test_bad_engine_values(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="m", **kw)


@pytest.mark.parametrize("value", ["full", "", "DUAL", 1, True])
def test_bad_request_values(value):
    with pytest.raises(ValueError, match=rf"SamplingParams.kv_cache={value!r}"):
        SamplingParams(kv_cache=value)


def test_backend_without_a_cache_path_is_refused(tiny_llada_dir, monkeypatch):
    from attention_backends.dense import DenseBackend
    with _engine(tiny_llada_dir, False) as llm:
        monkeypatch.setattr(DenseBackend, "supports_kv_cache", False)
        with pytest.raises(ValueError, match=r"SamplingParams.kv_cache='dual': attention backend 'dense' has no KV"):
            llm.generate(PROMPT, SamplingParams(max_tokens=8, kv_cache="dual"), use_tqdm=False)
        assert llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        with pytest.raises(ValueError, match=r"EngineConfig.kv_cache='prefix': attention backend 'dense' has no KV"):
            LLM(model=str(tiny_llada_dir), kv_cache="prefix")


def test_usage_gauge(tiny_llada_dir):
    from sparsed_engine.entrypoints.openai.metrics import _EngineCollector

    class _Snapshot:   # what the collector reads of an AsyncLLM
        def __init__(self, stats):
            self.stats, self.is_healthy, self.num_steps, self.step_seconds = stats, True, 0, 0.0

        def num_waiting(self):
            return self.stats["num_waiting"]

    def usage(stats):
        fams = {f.name: f for f in _EngineCollector(_Snapshot(stats), "m").collect()}
        return fams["sparsed:kv_cache_usage_perc"].samples[0].value

    p = SamplingParams(max_tokens=32, steps=8, block_length=8, kv_cache="dual")
    with _engine(tiny_llada_dir, False) as llm:
        eng = llm.llm_engine
        assert usage(eng.get_stats()) == 0.0
        eng.add_request(PROMPT, p)
        eng.step()
        kv = eng.get_stats()["kv_pool"]
        assert 0 < usage(eng.get_stats()) == kv["used_blocks"] / kv["total_blocks"]
        while eng.has_unfinished_requests():
            eng.step()
        assert usage(eng.get_stats()) == 0.0


def test_sequence_parallel_equals_one_rank(tiny_dream_dir):
    """Each rank caches the K/V of its own heads after the all-to-all (Dream's GQA: one KV head a
    rank): two mp ranks give one rank's tokens, each rank holding a pool of the same pages."""
    prompts = [PROMPT, "Hello world"]
    params = [SamplingParams(max_tokens=16, steps=8, block_length=8, kv_cache="dual"),
              SamplingParams(max_tokens=16, steps=8, block_length=8, kv_cache="prefix")]
    with _engine(tiny_dream_dir, True, device="cpu") as one:   # the two CPU ranks' reference
        want = _tokens(one.generate(prompts, params, use_tqdm=False))
    with _engine(tiny_dream_dir, True, device="cpu", sequence_parallel_size=2,
                 distributed_executor_backend="mp") as two:
        got = _tokens(two.generate(prompts, params, use_tqdm=False))
        stats = two.get_stats()["kv_pool"]
        assert stats["kv_allocated_bytes"] == 2 * stats["capacity_bytes"] > 0
        _assert_pools_empty(two)
    assert got == want


def test_fraction_sized_pool_is_capped_at_what_the_token_budget_can_fill(tiny_llada_dir):
    """kv_cache_memory_fraction of free memory, but no more pages than the scheduler could ever
    use (here a 12 GB CPU pool would otherwise be zeroed for a tiny model); a longest request fits."""
    with LLM(model=str(tiny_llada_dir), kv_cache="dual", max_num_batched_tokens=512, max_num_seqs=2,
             max_model_len=256) as llm:
        bm = llm.llm_engine.scheduler.block_manager
        assert bm.kv.num_blocks == -(-512 // 64) + 2 * 2
        prompt = list(range(5, 37))    # 32 tokens + 224 generated = max_model_len, two CFG rows
        longest = SamplingParams(max_tokens=224, steps=7, block_length=32, cfg_scale=1.0)
        out = llm.generate([prompt], longest, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason in ("length", "stop")
        _assert_pools_empty(llm)
