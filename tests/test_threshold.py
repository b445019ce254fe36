"""Confidence-threshold parallel decoding (Fast-dLLM v1) as each family's `confidence_threshold`
policy, in exact mode, against a restatement of its rule written here."""
import pytest
import torch
import torch.nn.functional as F

from model_executor.denoisers.dream import dream_transfer_count
from sparsed_engine import LLM, SamplingParams
from tests.reference_generate import raw_logits


# float32 engines (conftest's are dtype auto: bfloat16 on a GPU), so that comparing the engine's
# batched steps with the restatement's one-row forward does not hinge on bf16 near-ties
@pytest.fixture(scope="module")
def llada(tiny_llada_dir):
    return LLM(model=str(tiny_llada_dir), dtype="float32")


@pytest.fixture(scope="module")
def dream(tiny_dream_dir):
    return LLM(model=str(tiny_dream_dir), dtype="float32")


def _ids(llm, text):
    return llm.get_tokenizer().encode(text)


def _logits(llm, x):
    """Full-canvas logits as the family's reference reads them (Dream: shifted by one), with the
    mask id never chosen (the engine's rule: a committed mask id would stay masked)."""
    worker = llm.llm_engine.executor.worker
    raw = raw_logits(worker.model, worker.backend, x)
    if worker.model.logits_shift:
        raw = torch.cat([raw[:1], raw[:-1]], dim=0)
    raw[:, llm.llm_engine.info.mask_token_id] = -float("inf")
    return raw


def threshold_generate(llm, prompt, gen_length, block_length, steps, threshold):
    """The rule, greedy: per step, among the current block's masked positions, commit every one whose
    confidence (the softmax probability of its argmax token) is >= threshold, and at least the most
    confident; the block's last allotted step commits all that remain; a block ends when empty.
    Returns (generated tokens, steps taken)."""
    mask_id = llm.llm_engine.info.mask_token_id
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    P, num_blocks = len(prompt), gen_length // block_length
    spb, taken = steps // num_blocks, 0
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        for i in range(spb):
            masked = [p for p in range(lo, hi) if x[p] == mask_id]
            if not masked:
                break
            taken += 1
            probs = F.softmax(_logits(llm, x)[masked], dim=-1)
            conf, x0 = probs.max(dim=-1)
            if i == spb - 1:
                chosen = list(range(len(masked)))
            else:
                order = sorted(range(len(masked)), key=lambda j: -float(conf[j]))
                chosen = [j for j in order if conf[j] >= threshold] or order[:1]
            for j in chosen:
                x[masked[j]] = x0[j]
        assert not (x[lo:hi] == mask_id).any()
    return x[P:].tolist(), taken


def _first_step_median(llm, prompt, gen_length, block_length):
    """A threshold about half of the first block's positions reach at its first step: halfway
    between the two middle confidences, so that no position sits on it."""
    mask_id = llm.llm_engine.info.mask_token_id
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    P = len(prompt)
    conf = F.softmax(_logits(llm, x)[P:P + block_length], dim=-1).max(dim=-1).values.sort().values
    mid = len(conf) // 2
    return float(conf[mid - 1] + conf[mid]) / 2


def _params(threshold, **kw):
    return SamplingParams(unmasking="confidence_threshold", threshold=threshold, **kw)


@pytest.mark.parametrize("which", ["llada", "dream"])
@pytest.mark.parametrize("max_tokens,block,steps", [(16, 8, 16), (16, 16, 16), (12, 4, 6)])
@pytest.mark.parametrize("kind", ["median", "low", "above_one"])
def test_matches_restated_rule(request, which, max_tokens, block, steps, kind):
    llm = request.getfixturevalue(which)
    prompt = _ids(llm, "The quick brown fox")
    thr = {"median": _first_step_median(llm, prompt, max_tokens, block), "low": 1e-6, "above_one": 1.5}[kind]
    out = llm.generate([prompt], _params(thr, max_tokens=max_tokens, block_length=block, steps=steps),
                       use_tqdm=False)[0]
    expect, taken = threshold_generate(llm, prompt, max_tokens, block, steps, thr)
    got = out.outputs[0].token_ids
    assert got and got == expect[:len(got)]
    assert out.metrics.steps == taken
    if kind == "median":   # several committed at once, but not the whole block: the threshold decided
        assert max_tokens // block < taken <= steps
        if steps // (max_tokens // block) == block:   # room for one a step: the threshold saved steps
            assert taken < steps


def test_above_one_is_llada_low_confidence(llada):
    """One token a step: LLaDA's even schedule with steps_per_block == block_length."""
    for prompt in ("The quick brown fox", "Hello world", "Two"):
        for max_tokens, block, temp in ((16, 8, 0.0), (12, 4, 0.0), (8, 8, 0.7)):
            kw = dict(max_tokens=max_tokens, block_length=block, steps=max_tokens, temperature=temp, seed=2)
            a = llada.generate([prompt], _params(1.01, **kw), use_tqdm=False)[0]
            b = llada.generate([prompt], SamplingParams(unmasking="low_confidence", **kw), use_tqdm=False)[0]
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.metrics.steps == b.metrics.steps == max_tokens


def test_above_one_is_dream_maskgit_plus(dream, monkeypatch):
    """One token a step. Dream's own timestep schedule never gives that in float32 (it commits 0 at
    some steps, e.g. steps=8, eps=0: 1,0,1,0,1,0,1,1), so maskgit_plus runs here under a one-a-step
    schedule put in place of the family's; its choice of position and token (the sampled token's
    probability, greedy and sampled) must then equal the threshold policy's."""
    assert [dream_transfer_count(8 - i, i, 8, 0.0) for i in range(8)] != [1] * 8
    monkeypatch.setattr(dream.llm_engine.denoiser, "transfer", lambda num_masked, i, params: (1, 0.0))
    for max_tokens, block in ((16, 8), (12, 4), (8, 8)):
        for prompt in ("Hello world! This is", "Two"):
            for temp in (0.0, 0.8):
                kw = dict(max_tokens=max_tokens, block_length=block, steps=max_tokens, temperature=temp, seed=3)
                a = dream.generate([prompt], _params(7.0, **kw), use_tqdm=False)[0]
                b = dream.generate([prompt], SamplingParams(unmasking="maskgit_plus", **kw), use_tqdm=False)[0]
                assert a.outputs[0].token_ids == b.outputs[0].token_ids
                assert a.metrics.steps == b.metrics.steps == max_tokens


def test_batched_equals_alone(llada, dream):
    for llm in (llada, dream):
        prompts = ["Hello world", "The scheduler decides which sequences run in the next step.", "Two", "Hi"]
        med = _first_step_median(llm, _ids(llm, prompts[0]), 16, 8)
        params = [_params(med, max_tokens=16, steps=16, block_length=8),
                  _params(0.3, max_tokens=8, steps=8, temperature=0.7, seed=5),
                  _params(1e-6, max_tokens=12, steps=6, block_length=4, cfg_scale=0.5),
                  SamplingParams(max_tokens=8, steps=8)]   # mixed with another policy
        batched = llm.generate(prompts, params, use_tqdm=False)
        alone = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
        assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
        assert [o.metrics.steps for o in batched] == [o.metrics.steps for o in alone]


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_low_threshold_takes_fewer_steps(request, which):
    llm = request.getfixturevalue(which)
    out = llm.generate(["Hello"], _params(1e-6, max_tokens=16, block_length=4, steps=16), use_tqdm=False)[0]
    assert out.metrics.steps == 4            # every position reaches it: one step per block
    assert out.outputs[0].finish_reason in ("length", "stop")
    full = llm.generate(["Hello"], _params(2.0, max_tokens=16, block_length=4, steps=16), use_tqdm=False)[0]
    assert full.metrics.steps == 16


def test_sparsed_counts_steps_taken(tiny_llada_dir, llada):
    """SparseD's schedule runs over the steps taken (selection at int(steps*skip)+1 = step 5 here):
    a request that ends in 2 steps never selects (it equals dense attention), one taking one token
    a step selects at step 5 as low_confidence does; the pattern pool is empty afterwards."""
    llm = LLM(model=str(tiny_llada_dir), attention_backend="sparsed", dtype="float32",   # llada's dtype
              attention_config={"skip": 0.25, "select": 0.2, "block_size": 16})
    prompt = _ids(llm, "The quick brown fox jumps over the lazy dog. " * 4)
    kw = dict(max_tokens=16, block_length=8, steps=16)
    early = llm.generate([prompt], _params(1e-6, **kw), use_tqdm=False)[0]
    assert early.metrics.steps == 2
    dense = llada.generate([prompt], _params(1e-6, **kw), use_tqdm=False)[0]
    assert early.outputs[0].token_ids == dense.outputs[0].token_ids
    one = llm.generate([prompt], _params(2.0, **kw), use_tqdm=False)[0]
    conf = llm.generate([prompt], SamplingParams(unmasking="low_confidence", **kw), use_tqdm=False)[0]
    assert one.metrics.steps == 16 and one.outputs[0].token_ids == conf.outputs[0].token_ids
    stats = llm.llm_engine.get_stats()["mask_pool"]
    assert stats["used_blocks"] == stats["reserved_blocks"] == 0


@pytest.mark.parametrize("kw,match", [
    (dict(unmasking="confidence_threshold", threshold=float("nan")), r"SamplingParams.threshold=nan"),
    (dict(unmasking="confidence_threshold", threshold=0.0), r"SamplingParams.threshold=0.0"),
    (dict(unmasking="confidence_threshold", threshold=-0.5), r"SamplingParams.threshold=-0.5"),
    (dict(unmasking="confidence_threshold", threshold=float("inf")), r"SamplingParams.threshold=inf"),
    (dict(unmasking="confidence_threshold", threshold=True), r"SamplingParams.threshold=True"),
    (dict(unmasking="confidence_threshold", threshold="0.9"), r"SamplingParams.threshold='0.9'"),
    (dict(unmasking="confidence_threshold"), r"SamplingParams.threshold=None: .*needs a threshold"),
    (dict(unmasking="low_confidence", threshold=0.9), r"SamplingParams.threshold=0.9: applies to"),
])
def test_bad_values_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_threshold_checked_against_the_resolved_policy(llada, dream):
    # no unmasking given: the family's default policy does not take a threshold
    with pytest.raises(ValueError, match=r"SamplingParams.threshold=0.9 does not apply to the 'low_confidence' policy"):
        llada.generate("hi", SamplingParams(max_tokens=8, threshold=0.9), use_tqdm=False)
    with pytest.raises(ValueError, match=r"SamplingParams.alg_temp=0.5 does not apply to 'confidence_threshold'"):
        dream.generate("hi", _params(0.9, max_tokens=8, alg_temp=0.5), use_tqdm=False)
    assert not llada.llm_engine.has_unfinished_requests() and not dream.llm_engine.has_unfinished_requests()


def test_cli_and_server_fields(tiny_llada_dir, llada, capsys):
    """`--threshold` on the CLI, `threshold` in a server request body: the same SamplingParams."""
    from sparsed_engine.entrypoints.cli import main as cli_main
    from sparsed_engine.entrypoints.openai.protocol import CompletionRequest
    body = CompletionRequest(prompt="Hello", max_tokens=8, unmasking="confidence_threshold", threshold=0.2)
    assert body.sampling_params() == _params(0.2, max_tokens=8)
    with pytest.raises(ValueError, match=r"SamplingParams.threshold=None"):
        CompletionRequest(prompt="Hello", unmasking="confidence_threshold").sampling_params()
    cli_main(["generate", "--model", str(tiny_llada_dir), "--dtype", "float32", "--prompt", "Hello",
              "--max-tokens", "8", "--unmasking", "confidence_threshold", "--threshold", "0.2"])
    expect = llada.generate(["Hello"], _params(0.2, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert expect and expect in capsys.readouterr().out


def test_policy_from_generation_config_needs_threshold(tmp_path):
    import json
    from tests.tiny_checkpoints import write_tiny_llada
    folder = write_tiny_llada(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"remasking": "confidence_threshold"}))
    llm = LLM(model=str(folder))
    with pytest.raises(ValueError, match=r"SamplingParams.threshold=None: the 'confidence_threshold' policy needs"):
        llm.generate("hi", SamplingParams(max_tokens=8), use_tqdm=False)
    out = llm.generate("hi", SamplingParams(max_tokens=8, threshold=1e-6), use_tqdm=False)[0]
    assert out.metrics.steps == 1
