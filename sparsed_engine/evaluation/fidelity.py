"""Is SparseD lossless on a trained model? Dense vs SparseD settings vs two ablations that fail.

Every configuration sees the same inputs, built from text the model never trained on (the
held-out standard-library files, heldout.py), with the same seeds:

(a) passkey retrieval: `samples` prompts per canvas length; each is held-out filler with
    "The pass key is NNNNN. Remember it." at an evenly spread depth, then "What is the pass key?
    The pass key is"; greedy LLaDA decoding of `gen` tokens (one per step, one block); a hit is
    an exact match of the first number generated. Each cell carries its 95% interval, and
    "within 1 point of dense" is judged on the same prompts with McNemar's test (stats.py).
(b) masked-token NLL at mask ratios 0.3 / 0.6 / 0.9 of a generation-like nested schedule, the
    pattern selected at the setting's own selection step (measures.py).
(c) agreement with dense: teacher-forced along the dense greedy trajectory (per-step top-1
    agreement and KL of the committed positions' distributions), and free-running greedy
    agreement as a secondary column (measures.py).

Rounding baseline: dense in the other precision (float32 on GPU, bfloat16 on CPU) shows how far
rounding alone moves each measure.

Ablations (ablations.py): "sparse from step 0" (no dense warm-up) and a sliding window (a band
around the diagonal keeping, per head and query block, exactly as many key blocks as SparseD keeps).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from model_executor.model_loader import load_tokenizer
from sparsed_engine.evaluation import ablations
from sparsed_engine.evaluation.heldout import heldout_stream
from sparsed_engine.evaluation.measures import (Setting, continuations, dense_trajectory, first_number_hits,
                                                free_running_agreement, make_llm, masked_nll,
                                                teacher_forced_agreement)
from sparsed_engine.evaluation.ruler import DEPTHS, depth_bucket
from sparsed_engine.evaluation.stats import accuracy_cell, mcnemar_p, within_points
from sparsed_engine.evaluation.templates import PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey

RATIOS = (0.3, 0.6, 0.9)

# Dense in the other precision: how far rounding alone moves each measure, greedy agreement above all.
ROUNDING_BASELINE = Setting("dense, other precision (rounding baseline)", "dense", dtype="other")


def sparsed(skip: float, select: float, block_size: int) -> Setting:
    return Setting(f"SparseD skip={skip} select={select} bs={block_size}", "sparsed",
                   {"skip": skip, "select": select, "block_size": block_size})


def grid(block_size: int) -> list[Setting]:
    """Dense (and its rounding baseline), SparseD around the paper's default (skip 0.2, select 0.3),
    then the two ablations."""
    ablation = {"skip": 0.2, "select": 0.3, "block_size": block_size}
    return [Setting("dense", "dense"), ROUNDING_BASELINE, sparsed(0.2, 0.3, block_size), sparsed(0.2, 0.3, block_size // 2),
            sparsed(0.2, 0.1, block_size), sparsed(0.2, 0.5, block_size), sparsed(0.1, 0.3, block_size),
            Setting(f"ablation: sparse from step 0, select=0.3 bs={block_size}", "sparsed_step0", ablation),
            Setting(f"ablation: sliding window at SparseD density, bs={block_size}", "sparsed_window", ablation)]


@dataclass(frozen=True)
class Scale:
    passkey_lengths: tuple[int, ...]
    passkey_samples: int
    passkey_gen: int
    nll_length: int
    nll_docs: int
    agree_lengths: tuple[int, ...]
    agree_prompts: int
    agree_gen: int
    agree_block: int
    settings: list[Setting] = field(default_factory=list)
    nll_steps: int = 64          # the generation the NLL schedule stands for


FULL = Scale((1024, 2048, 4096), 500, 16, 2048, 64, (1024, 2048), 50, 64, 32, grid(128))
SMALL = Scale((256, 512), 12, 8, 512, 8, (512,), 4, 32, 16, grid(32))


# ---------------------------------------------------------------- inputs
def _space_led(tokenizer) -> list[bool]:
    """Byte-level BPE ids whose text starts with a space: inserting before them keeps words whole."""
    return [t.startswith("Ġ") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


def passkey_prompts(tokenizer, stream: list[int], length: int, n: int, gen: int, seed: int):
    """[(prompt ids, key)]: prompt + gen = length tokens; needle depths spread evenly over (0, 1)."""
    rng, space_led = random.Random(seed), _space_led(tokenizer)
    out = []
    for i in range(n):
        key = passkey(rng)
        needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key), add_special_tokens=False)
        question = tokenizer.encode(PASSKEY_QUESTION, add_special_tokens=False)
        n_fill = length - gen - len(needle) - len(question)
        start = rng.randrange(len(stream) - n_fill)
        filler = stream[start:start + n_fill]
        at = int((i + 0.5) / n * n_fill)
        while at < n_fill and not space_led[filler[at]]:
            at += 1
        out.append((filler[:at] + needle + filler[at:] + question, key))
    return out


def windows(stream: list[int], length: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [stream[s:s + length] for s in (rng.randrange(len(stream) - length) for _ in range(n))]


def by_depth(hits: list[bool]) -> dict:
    """Accuracy per needle-depth third; passkey_prompts puts prompt i at depth (i + 0.5) / n."""
    out = {}
    for third in DEPTHS:
        mine = [h for i, h in enumerate(hits) if depth_bucket((i + 0.5) / len(hits)) == third]
        if mine:
            out[third] = sum(mine) / len(mine)
    return out


# ---------------------------------------------------------------- the run
def run(model: str, scale: Scale, device: str, seed: int = 0, log=print) -> dict:
    """Every measure for every setting -> {label: {"passkey": {L: acc}, "passkey_hits": {L: [hit]},
    "passkey_depth": {L: {third: acc}}, "nll": {r: nll}, "agree_tf": {L: top-1 share}, "kl_tf": {L: nats},
    "agree": {L: free-running share}}}."""
    ablations.register()
    max_len = max(scale.passkey_lengths + scale.agree_lengths + (scale.nll_length,))
    tokenizer = load_tokenizer(model)
    stream = heldout_stream(tokenizer)
    passkeys = {n: passkey_prompts(tokenizer, stream, n, scale.passkey_samples, scale.passkey_gen, seed + n)
                for n in scale.passkey_lengths}
    agree_prompts = {n: windows(stream, n - scale.agree_gen, scale.agree_prompts, seed + 1 + n)
                     for n in scale.agree_lengths}
    docs = windows(stream, scale.nll_length, scale.nll_docs, seed + 2)
    reference = make_llm(model, Setting("dense", "dense"), device, max_len)
    trajectories = {n: dense_trajectory(reference, p, scale.agree_gen, scale.agree_block, scale.agree_gen)
                    for n, p in agree_prompts.items()}
    reference.shutdown()
    results, dense_out = {}, {}
    for setting in scale.settings:
        llm = make_llm(model, setting, device, max_len)
        eos = min(llm.llm_engine.eos_token_ids)
        hits = {n: first_number_hits(llm, p, scale.passkey_gen) for n, p in passkeys.items()}
        r = {"passkey": {n: sum(h) / len(h) for n, h in hits.items()}, "passkey_hits": hits,
             "passkey_depth": {n: by_depth(h) for n, h in hits.items()},
             "nll": {ratio: masked_nll(llm, setting, docs, ratio, seed + 3, scale.nll_steps) for ratio in RATIOS},
             "agree_tf": {}, "kl_tf": {}, "agree": {}}
        for n, prompts in agree_prompts.items():
            r["agree_tf"][n], r["kl_tf"][n] = teacher_forced_agreement(llm, setting, trajectories[n])
            outs = continuations(llm, prompts, scale.agree_gen, scale.agree_block)
            dense_out.setdefault(n, outs)
            r["agree"][n] = free_running_agreement(outs, dense_out[n], eos)
        results[setting.label] = r
        log(f"{setting.label}: {json.dumps({k: v for k, v in r.items() if k != 'passkey_hits'})}")
        llm.shutdown()
        del llm
    return results


# ---------------------------------------------------------------- reporting
def table(results: dict) -> str:
    first = next(iter(results.values()))
    dense = results.get("dense", first)
    lengths = list(first["passkey"])
    head = ([f"passkey@{n} [95% CI]" for n in lengths] + [f"within 1 pt @{n} (McNemar p)" for n in lengths]
            + [f"depth s/m/e @{n}" for n in lengths] + [f"NLL r={r} (vs dense)" for r in first["nll"]]
            + [f"TF agree@{n} (KL)" for n in first["agree_tf"]] + [f"free agree@{n}" for n in first["agree"]])
    lines = ["| setting | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, r in results.items():
        cells = [accuracy_cell(h) for h in r["passkey_hits"].values()]
        cells += [f"{within_points(dense['passkey_hits'][n], h)} ({mcnemar_p(dense['passkey_hits'][n], h):.2g})"
                  for n, h in r["passkey_hits"].items()]
        cells += ["/".join(f"{100 * d[t]:.0f}" if t in d else "-" for t in DEPTHS) for d in r["passkey_depth"].values()]
        cells += [f"{v:.4f} ({100 * (v / dense['nll'][k] - 1):+.2f}%)" for k, v in r["nll"].items()]
        cells += [f"{100 * a:.1f}% ({r['kl_tf'][n]:.3f})" for n, a in r["agree_tf"].items()]
        cells += [f"{100 * a:.1f}%" for a in r["agree"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
