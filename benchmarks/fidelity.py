"""Is SparseD lossless on a trained model? Dense vs SparseD settings vs two ablations that fail.

Every configuration sees the same inputs, built from text the model never trained on (the
held-out standard-library files of examples/build_corpus.py), with the same seeds:

(a) passkey retrieval: `samples` prompts per canvas length; each is held-out filler with
    "The pass key is NNNNN. Remember it." at an evenly spread depth, then "What is the pass key?
    The pass key is"; greedy LLaDA decoding of `gen` tokens (one per step, one block); a hit is
    an exact match of the first number generated.
(b) masked-token NLL: held-out windows, the first half clean (the "prompt"), each token of the
    second half masked with probability r. Dense: one forward. SparseD and the window ablation:
    a SELECT pass (dense attention, the pattern chosen from it) on that same masked input, then a
    SPARSE pass with that pattern, whose logits are scored. Step-0 ablation: the pattern is chosen
    from the second half fully masked (what step 0 sees), then the sparse pass runs on the
    ratio-r input. NLL is the mean cross-entropy over the masked tokens. `skip` plays no part
    here: one step, its pattern taken from its own input.
(c) greedy agreement: held-out prompts continued for `gen` tokens (semi-autoregressive blocks);
    the share of generated positions equal to dense's (EOS-padded after an end of text).

Rounding baseline: dense in the other precision (float32 on GPU, bfloat16 on CPU) shows how far
rounding alone moves each measure; greedy agreement, where one changed token changes all that
follow, moves most.

Ablations (benchmarks/fidelity_backends.py): "sparse from step 0" (no dense warm-up) and a
sliding window (a band around the diagonal keeping, per head and query block, exactly as many
key blocks as SparseD keeps). Prints a table, writes a PNG and JSON under --out, and appends the
table to benchmarks/RESULTS.md with the device name and date.

    python -m benchmarks.fidelity                       # GPU, full scale (~45 s a setting on an H200, ~7 min)
    python -m benchmarks.fidelity --small --device cpu  # CPU, small scale (~3 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from attention_backends.base import DENSE, SELECT, SPARSE, RowSpec
from benchmarks import fidelity_backends
from examples.build_corpus import heldout_documents
from examples.train_tiny_dlm import PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey
from model_executor.model_loader import load_tokenizer
from model_executor.step_input import RowInput, StepInput
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.llm import DEFAULT_MODEL

RESULTS_MD = Path(__file__).with_name("RESULTS.md")
RATIOS = (0.3, 0.6, 0.9)


@dataclass(frozen=True)
class Setting:
    label: str
    backend: str
    attention_config: dict | None = None
    dtype: str = "auto"     # "other": float32 on GPU, bfloat16 on CPU (the rounding baseline)


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


FULL = Scale((1024, 2048, 4096), 200, 16, 2048, 64, (1024, 2048), 50, 64, 32, grid(128))
SMALL = Scale((256, 512), 12, 8, 512, 8, (512,), 4, 32, 16, grid(32))


# ---------------------------------------------------------------- inputs
def heldout_stream(tokenizer, max_chars: int = 1_000_000) -> list[int]:
    """Token ids of the held-out text (about 300k tokens: plenty of distinct 4k windows)."""
    text = "\n\n".join(heldout_documents(min_chars=2000))[:max_chars]
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


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


# ---------------------------------------------------------------- measures
def make_llm(model: str, setting: Setting, device: str, max_model_len: int) -> LLM:
    dtype = setting.dtype if setting.dtype != "other" else "float32" if device.startswith("cuda") else "bfloat16"
    return LLM(model=model, device=device, dtype=dtype, attention_backend=setting.backend,
               attention_config=setting.attention_config, max_model_len=max_model_len,
               mask_pool_bytes=1 << 26, mask_pool_block_bytes=4096, max_num_seqs=256,
               max_num_batched_tokens=1 << 20)


def passkey_accuracy(llm: LLM, prompts, gen: int) -> float:
    params = SamplingParams(max_tokens=gen, steps=gen, block_length=gen, temperature=0.0, seed=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in prompts], params, use_tqdm=False)
    hits = 0
    for out, (_, key) in zip(outs, prompts):
        number = re.search(r"\d+", out.outputs[0].text)
        hits += number is not None and number.group() == key
    return hits / len(prompts)


def continuations(llm: LLM, prompts: list[list[int]], gen: int, block: int) -> list[list[int]]:
    """Greedy continuations, padded with EOS to `gen` tokens (the engine cuts at the first EOS)."""
    params = SamplingParams(max_tokens=gen, steps=gen, block_length=block, temperature=0.0, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    eos = min(llm.llm_engine.eos_token_ids)
    return [list(o.outputs[0].token_ids) + [eos] * (gen - len(o.outputs[0].token_ids)) for o in outs]


def masked_nll(llm: LLM, setting: Setting, docs: list[list[int]], ratio: float, seed: int) -> float:
    """Mean NLL of the masked tokens of the docs' second halves (see the module docstring)."""
    engine = llm.llm_engine
    mask_id, bm = engine.info.mask_token_id, engine.scheduler.block_manager
    g = torch.Generator().manual_seed(seed)
    rows, select_rows, targets = [], [], []
    for i, doc in enumerate(docs):
        ids = torch.tensor(doc)
        half = len(doc) // 2
        masked = torch.zeros(len(doc), dtype=torch.bool)
        masked[half:] = torch.rand(len(doc) - half, generator=g) < ratio
        positions = masked.nonzero().squeeze(-1)
        canvas = torch.where(masked, mask_id, ids)
        targets.append(ids[positions])
        if setting.backend == "dense":
            rows.append(RowInput(canvas, positions, RowSpec(len(doc), half, DENSE)))
            continue
        cfg = engine.backend_cls.resolve_config(setting.attention_config)
        # one step in the middle of a long request: the pattern size does not depend on the step
        n_blocks = engine.backend_cls.pattern_blocks_needed(engine.layout, len(doc), cfg, bm.block_bytes, 1000)
        bm.reserve(f"nll{i}", n_blocks)
        blocks = bm.allocate(f"nll{i}")
        selected_on = canvas.clone()
        if setting.backend == "sparsed_step0":
            selected_on[half:] = mask_id
        select_rows.append(RowInput(selected_on, positions, RowSpec(len(doc), half, SELECT, blocks, cfg)))
        rows.append(RowInput(canvas, positions, RowSpec(len(doc), half, SPARSE, blocks, cfg)))
    try:
        if select_rows:
            engine.executor.execute(StepInput(select_rows))
        logits = engine.executor.execute(StepInput(rows))
    finally:
        for i in range(len(docs)):
            bm.free(f"nll{i}")
    logits, target = torch.cat([lg.float().cpu() for lg in logits]), torch.cat(targets)
    return F.cross_entropy(logits, target).item()


def run(model: str, scale: Scale, device: str, seed: int = 0, log=print) -> dict:
    """Every measure for every setting -> {label: {"passkey": {L: acc}, "nll": {r: nll}, "agree": {L: share}}}."""
    fidelity_backends.register()
    max_len = max(scale.passkey_lengths + scale.agree_lengths + (scale.nll_length,))
    tokenizer = load_tokenizer(model)
    stream = heldout_stream(tokenizer)
    passkeys = {n: passkey_prompts(tokenizer, stream, n, scale.passkey_samples, scale.passkey_gen, seed + n)
                for n in scale.passkey_lengths}
    agree_prompts = {n: windows(stream, n - scale.agree_gen, scale.agree_prompts, seed + 1 + n)
                     for n in scale.agree_lengths}
    docs = windows(stream, scale.nll_length, scale.nll_docs, seed + 2)
    results, dense_out = {}, {}
    for setting in scale.settings:
        llm = make_llm(model, setting, device, max_len)
        r = {"passkey": {n: passkey_accuracy(llm, p, scale.passkey_gen) for n, p in passkeys.items()},
             "nll": {ratio: masked_nll(llm, setting, docs, ratio, seed + 3) for ratio in RATIOS},
             "agree": {}}
        for n, prompts in agree_prompts.items():
            outs = continuations(llm, prompts, scale.agree_gen, scale.agree_block)
            dense_out.setdefault(n, outs)
            same = [a == b for o, d in zip(outs, dense_out[n]) for a, b in zip(o, d)]
            r["agree"][n] = sum(same) / len(same)
        results[setting.label] = r
        log(f"{setting.label}: {json.dumps(r)}")
        llm.shutdown()
        del llm
    return results


# ---------------------------------------------------------------- reporting
def table(results: dict) -> str:
    first = next(iter(results.values()))
    dense = results.get("dense", first)
    head = ([f"passkey@{n}" for n in first["passkey"]] + [f"NLL r={r} (vs dense)" for r in first["nll"]]
            + [f"agree@{n}" for n in first["agree"]])
    lines = ["| setting | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, r in results.items():
        cells = [f"{100 * a:.1f}%" for a in r["passkey"].values()]
        cells += [f"{v:.4f} ({100 * (v / dense['nll'][k] - 1):+.2f}%)" for k, v in r["nll"].items()]
        cells += [f"{100 * a:.1f}%" for a in r["agree"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    for label, r in results.items():
        style = "--" if label.startswith("ablation") else "-"
        axes[0].plot(list(r["passkey"]), [100 * a for a in r["passkey"].values()], style, marker="o", label=label)
        axes[1].plot(list(r["nll"]), [100 * (v / dense["nll"][k] - 1) for k, v in r["nll"].items()], style,
                     marker="o", label=label)
    labels = [k for k in results if k != "dense"]
    means = [100 * sum(results[k]["agree"].values()) / len(results[k]["agree"]) for k in labels]
    axes[2].barh(range(len(labels)), means)
    axes[2].set_yticks(range(len(labels)), [textwrap.fill(k, 34) for k in labels], fontsize=7)
    axes[0].set(xlabel="canvas length (tokens)", ylabel="passkey accuracy (%)", title="(a) passkey retrieval",
                ylim=(-3, 103))
    axes[1].set(xlabel="mask ratio", ylabel="masked-token NLL vs dense (%)", title="(b) NLL change")
    axes[2].set(xlabel="greedy tokens equal to dense (%)", title="(c) agreement with dense")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--small", action="store_true", help="CPU scale (short canvases, few samples)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=None, help="passkey prompts per length")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--results-md", default=str(RESULTS_MD))
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the settings whose label contains one of these (dense always runs)")
    args = ap.parse_args()
    scale = SMALL if args.small else FULL
    if args.only:
        scale = dataclasses.replace(scale, settings=[s for s in scale.settings if s.label == "dense"
                                                     or any(o in s.label for o in args.only)])
    if args.samples:
        scale = dataclasses.replace(scale, passkey_samples=args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results = run(args.model, scale, args.device)
    md = table(results)
    stamp = datetime.date.today().isoformat()
    title = (f"Fidelity, {'small' if args.small else 'full'} scale, {Path(args.model).name}, "
             f"{device_name}, torch {torch.__version__}, {stamp}")
    (out / "fidelity.json").write_text(json.dumps({"title": title, "scale": dataclasses.asdict(scale),
                                                   "results": results}, indent=2))
    plot(results, out / "fidelity.png", title)
    with open(args.results_md, "a") as f:
        f.write(f"\n## Fidelity (`python -m benchmarks.fidelity{' --small' if args.small else ''}`)\n### {title}\n\n"
                f"{scale.passkey_samples} passkey prompts per length, {scale.nll_docs} NLL windows of "
                f"{scale.nll_length} tokens, {scale.agree_prompts} continuations of {scale.agree_gen} tokens "
                f"per length. Plot: {out / 'fidelity.png'}.\n\n{md}\n")
    print(f"\n{title}\n{md}")


if __name__ == "__main__":
    main()
