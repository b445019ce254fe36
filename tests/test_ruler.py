"""The RULER-style suite: exact prompt lengths, the needles where they belong, RULER's scoring,
and the bundled model retrieving on small CPU-sized rows."""
import pytest

from sparsed_engine import LLM
from sparsed_engine.evaluation.ruler import GEN, TASKS, build_samples, depth_bucket, evaluate, score
from sparsed_engine.llm import DEFAULT_MODEL
from model_executor.model_loader import load_tokenizer


@pytest.mark.parametrize("length,tasks", [(256, TASKS[:-1]), (1024, TASKS)])   # ten common words need > 256
def test_every_task_fills_the_canvas_exactly(length, tasks):
    tok = load_tokenizer(DEFAULT_MODEL)
    samples = build_samples(tok, length, 3, seed=0, tasks=tasks)
    assert [s.task for s in samples] == [t for t in tasks for _ in range(3)]
    for s in samples:
        assert len(s.prompt_ids) + GEN[s.task] == length
        text = tok.decode(s.prompt_ids)
        assert all(a in text for a in s.answers), (s.task, s.answers)
    single = [s for s in samples if s.task == "niah_single"]
    assert [depth_bucket(s.depth) for s in single] == ["start", "middle", "end"]
    text = tok.decode(single[0].prompt_ids)
    assert text.index(single[0].answers[0]) < len(text) // 3   # the first needle sits in the first third
    assert build_samples(tok, length, 3, seed=0, tasks=tasks)[5].prompt_ids == samples[5].prompt_ids   # seeded


def test_scoring_is_rulers_string_match_all():
    assert score(" 12345. and", ["12345"]) == 1.0
    assert score("Apple, river", ["apple", "RIVER", "maple"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown tasks"):
        build_samples(load_tokenizer(DEFAULT_MODEL), 256, 1, 0, tasks=["qa"])
    with pytest.raises(ValueError, match="length=64 is too short"):
        build_samples(load_tokenizer(DEFAULT_MODEL), 64, 1, 0, tasks=["niah_multiquery"])
    with pytest.raises(ValueError, match="length=256 is too short for the common-words"):
        build_samples(load_tokenizer(DEFAULT_MODEL), 256, 1, 0, tasks=["common_words"])


def test_bundled_model_finds_needles_on_small_rows():
    llm = LLM()
    result = evaluate(llm, build_samples(llm.get_tokenizer(), 256, 2, seed=0, tasks=["niah_single", "niah_multikey"]))
    assert set(result["tasks"]) == {"niah_single", "niah_multikey"} and len(result["scores"]) == 4
    assert result["average"] >= 0.5 and set(result["depth"]) <= {"start", "middle", "end"}
