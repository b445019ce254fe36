"""A RULER-style long-context task suite (Hsieh et al. 2024), written here from the task definitions.

Every prompt is exactly `length - gen` tokens, so prompt + generation fill a canvas of `length`.
The haystack is RULER's "noise" haystack (a few plain sentences repeated), so nothing is read from
disk; needles sit between sentences. The needles and questions are the templates the project's
models train on (templates.py) where a task has one.

  niah_single        one "The pass key is K." needle; the question asks for K
  niah_multikey      four "The secret number of NAME is K." needles with distinct names; one is asked
  niah_multivalue    four needles for one name with four values; all four are asked
  niah_multiquery    four needles with distinct names; two are asked at once
  variable_tracking  a chain "VAR A = 12345." "VAR B = A." ... (five names); every name holding the
                     value is asked
  common_words       a numbered word list where ten words recur many times and the rest once; the
                     ten most common are asked

Scoring is RULER's: per sample, the share of the expected answers found (case-insensitive) in the
generated text, so single-answer tasks score by exact match; a task's score is its samples'
mean, the suite's the mean over tasks. Needle depth (the asked needle's position in the haystack,
niah_single and niah_multikey) is reported as start / middle / end thirds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sparsed_engine import LLM, SamplingParams
from sparsed_engine.evaluation.templates import (KV_NAMES, KV_NEEDLE, KV_QUESTION, PASSKEY_NEEDLE,
                                                 PASSKEY_QUESTION, passkey)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words")
GEN = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 32,
       "variable_tracking": 32, "common_words": 64}  # tokens generated (one a step, one block)
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = ("start", "middle", "end")
VT_QUESTION = ("\nFind all variables that are assigned the value {value} in the text above. Answer: According "
               "to the chain of variable assignments in the text above, 5 variables are assigned the value "
               "{value}, they are:")
CW_QUESTION = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words "
               "that appear most often in the list are:")


@dataclass
class Sample:
    task: str
    prompt_ids: list[int]
    answers: list[str]
    depth: float | None = None     # the asked needle's relative position in the haystack


def depth_bucket(depth: float) -> str:
    return DEPTHS[min(int(depth * 3), 2)]


class _Builder:
    def __init__(self, tokenizer, length: int, rng: random.Random):
        self.tok, self.length, self.rng = tokenizer, length, rng
        self.sentences = [self.enc(" " + s) for s in NOISE]

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def haystack(self, needles: list[tuple[float, list[int]]], question: list[int], gen: int) -> list[int]:
        """Noise sentences around the needles (each at its relative depth), then the question: exactly
        length - gen tokens (the last sentence cut to fit)."""
        budget = self.length - gen - len(question) - sum(len(n) for _, n in needles)
        if budget < 0:
            raise ValueError(f"length={self.length} is too short for the task's needles and question")
        chunks, used, i = [], 0, 0
        while used < budget:
            s = self.sentences[i % len(self.sentences)][:budget - used]
            chunks.append(s)
            used += len(s)
            i += 1
        for depth, needle in sorted(needles, key=lambda x: x[0], reverse=True):
            chunks.insert(round(depth * len(chunks)), needle)
        return [t for c in chunks for t in c] + question

    def word(self) -> str:
        syll = ("ka", "lo", "mi", "ter", "sa", "ven", "du", "ri", "bel", "on", "ast", "pi", "gor", "nu", "fe")
        return "".join(self.rng.choice(syll) for _ in range(3))


def _niah(b: _Builder, task: str, depth: float) -> Sample:
    rng, gen = b.rng, GEN[task]
    if task == "niah_single":
        key = passkey(rng)
        return Sample(task, b.haystack([(depth, b.enc(PASSKEY_NEEDLE.format(key=key)))], b.enc(PASSKEY_QUESTION), gen),
                      [key], depth)
    names = rng.sample(KV_NAMES, 4)
    if task == "niah_multivalue":
        names = [names[0]] * 4
    keys = [passkey(rng) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    needles = [(d, b.enc(KV_NEEDLE.format(name=n, key=k))) for d, n, k in zip(depths, names, keys)]
    if task == "niah_multikey":
        return Sample(task, b.haystack(needles, b.enc(KV_QUESTION.format(name=names[0])), gen), [keys[0]], depth)
    if task == "niah_multivalue":
        q = f"\nWhat are all the secret numbers of {names[0]}? The secret numbers of {names[0]} are"
        return Sample(task, b.haystack(needles, b.enc(q), gen), keys)
    q = (f"\nWhat are the secret numbers of {names[0]} and {names[1]}? The secret numbers of {names[0]} "
         f"and {names[1]} are")
    return Sample(task, b.haystack(needles, b.enc(q), gen), keys[:2])


def _variable_tracking(b: _Builder) -> Sample:
    rng = b.rng
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = {names[i - 1]}." for i in range(1, 5)]
    depths = sorted(rng.random() for _ in chain)
    needles = [(d, b.enc(c)) for d, c in zip(depths, chain)]
    return Sample("variable_tracking", b.haystack(needles, b.enc(VT_QUESTION.format(value=value)),
                                                  GEN["variable_tracking"]), names)


def _common_words(b: _Builder) -> Sample:
    """Ten words recurring `c` times among words that occur once, numbered, shuffled, filling the
    prompt; c grows with the length so the ten stay clearly the most common."""
    gen, question = GEN["common_words"], b.enc(CW_QUESTION)
    vocab = list(dict.fromkeys(b.word() for _ in range(4000)))
    common, rare = vocab[:10], iter(vocab[10:])
    budget = b.length - gen - len(question)
    per_entry = max(len(b.enc(f" 999. {w}")) for w in common)
    entries = budget // per_entry
    c = max(2, entries // 40)
    words = common * c + [next(rare) for _ in range(max(entries - 10 * c, 0))]
    b.rng.shuffle(words)

    def numbered(ws):
        return [t for i, w in enumerate(ws, 1) for t in b.enc(f" {i}. {w}")]

    ids = numbered(words)
    while len(ids) > budget:   # a rare word's entry ran longer than estimated: drop rare words
        drop = -(-(len(ids) - budget) // per_entry)
        rare_at = [i for i, w in enumerate(words) if w not in common][-drop:]
        if not rare_at:
            raise ValueError(f"length={b.length} is too short for the common-words list")
        words = [w for i, w in enumerate(words) if i not in set(rare_at)]
        ids = numbered(words)
    filler = b.sentences[0] * (budget // len(b.sentences[0]) + 1)
    ids = filler[:budget - len(ids)] + ids   # the few tokens an entry could not fill
    return Sample("common_words", ids + question, common)


def make_sample(tokenizer, task: str, length: int, rng: random.Random, depth: float | None = None) -> Sample:
    """One sample of `task` at canvas length `length`; niah tasks put the asked needle at `depth`
    (random when None)."""
    if task not in TASKS:
        raise ValueError(f"unknown tasks {[task]}; known: {list(TASKS)}")
    b = _Builder(tokenizer, length, rng)
    if task.startswith("niah"):
        return _niah(b, task, rng.random() if depth is None else depth)
    return _variable_tracking(b) if task == "variable_tracking" else _common_words(b)


def build_samples(tokenizer, length: int, n: int, seed: int, tasks=TASKS) -> list[Sample]:
    """n samples per task at canvas length `length`; needle depths of the niah tasks spread evenly."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}-{task}-{length}")
        out += [make_sample(tokenizer, task, length, rng, (i + 0.5) / n) for i in range(n)]
    return out


def score(text: str, answers: list[str]) -> float:
    """RULER's string_match_all: the share of the answers found in the text (case-insensitive)."""
    return sum(a.lower() in text.lower() for a in answers) / len(answers)


def evaluate(llm: LLM, samples: list[Sample]) -> dict:
    """Greedy generation of every sample -> {"tasks": {task: score}, "average", "depth": {third: acc},
    "scores": [per sample, in order]}."""
    scores = [0.0] * len(samples)
    for task in dict.fromkeys(s.task for s in samples):
        idx = [i for i, s in enumerate(samples) if s.task == task]
        gen = GEN[task]
        params = SamplingParams(max_tokens=gen, steps=gen, block_length=gen, temperature=0.0, seed=0)
        outs = llm.generate([{"prompt_token_ids": samples[i].prompt_ids} for i in idx], params, use_tqdm=False)
        for i, out in zip(idx, outs):
            scores[i] = score(out.outputs[0].text, samples[i].answers)
    tasks = {}
    for task in dict.fromkeys(s.task for s in samples):
        mine = [sc for sc, s in zip(scores, samples) if s.task == task]
        tasks[task] = sum(mine) / len(mine)
    depth = {}
    for third in DEPTHS:
        mine = [sc for sc, s in zip(scores, samples) if s.depth is not None and depth_bucket(s.depth) == third]
        if mine:
            depth[third] = sum(mine) / len(mine)
    return {"tasks": tasks, "average": sum(tasks.values()) / len(tasks), "depth": depth, "scores": scores}
