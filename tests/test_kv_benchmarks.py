"""What the throughput-mode benchmarks compute from, checked against the engine on the tiny LLaDA:
the dual-cache SparseD schedule e2e --kv prices its totals with, the step labels of the timing
helpers, and the KV pool size they ask for; then `benchmarks.throughput --toy` and `benchmarks.e2e
--kv --toy` end to end (a few seconds each on an idle CPU). `benchmarks.kv_fidelity --small` takes
longer and is not run here."""
import json
import sys
from collections import Counter

import pytest
import torch

from attention_backends.base import kv_page_bytes
from benchmarks.e2e_kv import schedule_counts
from benchmarks.llada8b import kv_pool_bytes
from benchmarks.steps import StepClock, timed_kv_steps
from sparsed_engine import LLM, SamplingParams

CANVAS = 96


@pytest.fixture(scope="module")
def llm(tiny_llada_dir):
    return LLM(model=str(tiny_llada_dir), attention_backend="sparsed", max_num_seqs=2,
               kv_cache_bytes=kv_pool_bytes(str(tiny_llada_dir), CANVAS, 2, 4))


def _prompt(llm, n):
    ids = llm.get_tokenizer().encode("the quick brown fox jumps over the lazy dog " * 20, add_special_tokens=False)
    return ids[:n]


def test_kv_pool_bytes_is_whole_engine_pages(llm, tiny_llada_dir):
    """Two 96-token canvases: two 64-token pages each, and a spare one."""
    page = kv_page_bytes(llm.llm_engine.layout, 64, torch.float32)
    assert kv_pool_bytes(str(tiny_llada_dir), CANVAS, 2, 4) == 2 * (2 + 1) * page


@pytest.mark.parametrize("skip", [0.0, 0.2, 0.5, 1.0])
def test_schedule_counts_are_the_engines(llm, skip):
    """Every (step kind, phase) count the computed totals use equals what the engine runs."""
    params = SamplingParams(max_tokens=32, steps=16, block_length=8, kv_cache="dual",
                            attention_config={"skip": skip, "select": 0.3, "block_size": 16})
    steps = timed_kv_steps(llm, _prompt(llm, CANVAS - 32), params, lambda: None, max_steps=100)
    names = {("refresh", "dense"): "refresh_dense", ("cached", "dense"): "cached_dense", ("refresh", "select"): "select",
             ("refresh", "sparse"): "refresh_sparse", ("cached", "sparse"): "cached_sparse"}
    seen = Counter(names[kind, phase] for kind, phase, _ in steps)
    assert seen == Counter({k: v for k, v in schedule_counts(16, 4, skip).items() if v})


def test_timed_kv_steps_stops_and_frees(llm):
    params = SamplingParams(max_tokens=32, steps=32, block_length=8, kv_cache="dual", attention_config={"skip": 1.0})
    steps = timed_kv_steps(llm, _prompt(llm, CANVAS - 32), params, lambda: None, max_steps=5)
    assert [k for k, _, _ in steps] == ["refresh", "cached", "cached", "cached", "cached"]
    assert not llm.llm_engine.has_unfinished_requests()
    exact = SamplingParams(max_tokens=32, steps=32, block_length=8, kv_cache="none", attention_config={"skip": 1.0})
    exact = timed_kv_steps(llm, _prompt(llm, CANVAS - 32), exact, lambda: None, max_steps=2)
    assert [k for k, _, _ in exact] == ["exact", "exact"]


def test_step_clock_labels_generate_steps(llm):
    params = SamplingParams(max_tokens=16, steps=8, block_length=8, kv_cache="dual", attention_config={"skip": 1.0})
    with StepClock(llm, lambda: None) as clock:
        llm.generate([_prompt(llm, CANVAS - 16)] * 2, params, use_tqdm=False)
    assert [lab for lab, _ in clock.steps] == (["refresh"] + ["cached"] * 3) * 2
    assert "step" not in vars(llm.llm_engine)   # the engine's own step is back


def _run_main(monkeypatch, module, argv):
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


def test_throughput_toy_end_to_end(monkeypatch, tmp_path):
    from benchmarks import throughput
    _run_main(monkeypatch, throughput, ["--toy", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert len(rows) == 5
    for label, r in rows.items():
        assert r["tokens"] == 2 * 16 and r["tok_s"] > 0
        if "threshold" not in label:
            assert r["steps_mean"] == r["steps_max"] == 8
    dual = rows["dual cache, dense"]["step_times"]
    assert [lab for lab, _ in dual] == (["refresh"] + ["cached"] * 3) * 2
    md = (tmp_path / "throughput.md").read_text()
    assert md.count("\n| ") == 7 and "ESTIMATE (not measured end to end)" in md


def test_e2e_kv_toy_end_to_end(monkeypatch, tmp_path):
    from benchmarks import e2e
    _run_main(monkeypatch, e2e, ["--kv", "--toy", "--out", str(tmp_path)])
    md = (tmp_path / "e2e_kv.md").read_text()
    assert "| 128 | " in md and "1 selection refresh, 2 sparse refreshes, 21 sparse cached steps" in md
