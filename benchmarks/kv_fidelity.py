"""What throughput mode costs in fidelity (issue 13 part 5), on the bundled trained model
(sparsed_engine/config.DEFAULT_MODEL, a 12M LLaDA trained at 1-2k tokens).

Modes: exact (no cache), prefix and dual KV cache, each with dense attention and with SparseD, and
confidence-threshold decoding (0.9 / 0.95) with the dual cache and without a cache. Every mode sees
the same prompts and the same greedy decoding, in semi-AR blocks of --block tokens (default 8, so a
generation has several blocks: several refreshes, and text after the current block, where prefix and
dual differ), with `gen` steps for `gen` tokens (threshold decoding may take fewer):
  passkey    retrieval in held-out text at every --lengths (sparsed_engine/evaluation/fidelity.py's
             prompts): a hit is the first number generated equal to the key; 95% Wilson intervals.
             FLAG: a mode whose accuracy is more than 2 points below exact dense at any length.
  RULER      the RULER-style suite (evaluation/ruler.py) at --ruler-lengths, tasks --ruler-tasks; the
             average counts only the tasks exact dense scores at least 50% on (the ones this model
             can do); 95% normal intervals of the per-sample scores.
  agreement  free-running greedy token agreement with exact dense over all the outputs above (the
             secondary measure: one changed token changes what follows; on this model dense bf16
             vs float32 alone agree on ~84-90%, benchmarks/RESULTS.md).
  steps      denoising steps a request took (threshold decoding commits several tokens a step).
Prints the table, writes kv_fidelity.md / .json / .png under --out.

    python -m benchmarks.kv_fidelity --out $OUT               # GPU, full scale (~3 min on an H200)
    python -m benchmarks.kv_fidelity --small --out /tmp/kvf   # CPU, small scale (256/512 tokens)
    python -m benchmarks.kv_fidelity --model DIR --lengths 4096 8192 16384 --ruler-lengths 8192 \
        --samples 48 --block-size 128 --out $OUT            # the long-context model (issue 12's)
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.llada8b import kv_pool_bytes
from model_executor.model_loader import load_tokenizer
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.config import DEFAULT_MODEL
from sparsed_engine.evaluation import ruler
from sparsed_engine.evaluation.fidelity import passkey_prompts
from sparsed_engine.evaluation.heldout import heldout_stream
from sparsed_engine.evaluation.measures import free_running_agreement
from sparsed_engine.evaluation.stats import accuracy_cell, mcnemar_p, mean_interval

DENSE = {"skip": 1.0}
PASSKEY_GEN = 16
LOSS_POINTS = 2.0      # the bar: more than this many points of retrieval lost is flagged
CAN_DO = 0.5           # a RULER task counts when exact dense scores at least this on it


@dataclass(frozen=True)
class Mode:
    label: str
    kv_cache: str
    sparse: bool
    threshold: float | None = None

    def fields(self, sparse_cfg: dict) -> dict:
        f = {"kv_cache": self.kv_cache, "attention_config": sparse_cfg if self.sparse else DENSE}
        if self.threshold is not None:
            f.update(unmasking="confidence_threshold", threshold=self.threshold)
        return f


# the reference first; the rest in the order that matters most when --max-minutes cuts the run short
MODES = [Mode("exact, dense", "none", False), Mode("dual, dense", "dual", False), Mode("prefix, dense", "prefix", False),
         Mode("exact, SparseD", "none", True), Mode("dual, SparseD", "dual", True), Mode("prefix, SparseD", "prefix", True),
         Mode("dual, dense, threshold 0.9", "dual", False, 0.9), Mode("dual, dense, threshold 0.95", "dual", False, 0.95),
         Mode("dual, SparseD, threshold 0.9", "dual", True, 0.9),
         Mode("exact, dense, threshold 0.9", "none", False, 0.9), Mode("exact, dense, threshold 0.95", "none", False, 0.95)]


@dataclass(frozen=True)
class Scale:
    lengths: tuple[int, ...]
    samples: int
    ruler_lengths: tuple[int, ...]
    ruler_samples: int
    sparse: dict


FULL = Scale((1024, 2048, 4096), 200, (1024, 2048), 20, {"skip": 0.2, "select": 0.3, "block_size": 64})
SMALL = Scale((256, 512), 12, (512,), 4, {"skip": 0.2, "select": 0.3, "block_size": 16})


def generate(llm: LLM, prompts: list[list[int]], gen: int, block: int, fields: dict):
    params = SamplingParams(max_tokens=gen, steps=gen, block_length=min(block, gen), temperature=0.0, seed=0,
                            **fields)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens(out, gen: int, eos: int) -> list[int]:
    """The output's tokens padded with EOS to gen (the engine cuts at the first EOS)."""
    ids = list(out.outputs[0].token_ids)
    return ids + [eos] * (gen - len(ids))


def run_mode(llm: LLM, mode: Mode, passkeys: dict, rulers: dict, scale: Scale, block: int) -> dict:
    eos = min(llm.llm_engine.eos_token_ids)
    fields = mode.fields(scale.sparse)
    r = {"passkey_hits": {}, "ruler": {}, "tokens": {}, "steps": []}
    for n, prompts in passkeys.items():
        outs = generate(llm, [p for p, _ in prompts], PASSKEY_GEN, block, fields)
        r["passkey_hits"][n] = [bool((m := re.search(r"\d+", o.outputs[0].text)) and m.group() == key)
                                for o, (_, key) in zip(outs, prompts)]
        r["tokens"][n] = [tokens(o, PASSKEY_GEN, eos) for o in outs]
        r["steps"] += [o.metrics.steps / PASSKEY_GEN for o in outs]
    for n, samples in rulers.items():
        scores, toks = [0.0] * len(samples), [None] * len(samples)
        for task in dict.fromkeys(s.task for s in samples):
            idx = [i for i, s in enumerate(samples) if s.task == task]
            gen = ruler.GEN[task]
            outs = generate(llm, [samples[i].prompt_ids for i in idx], gen, block, fields)
            for i, o in zip(idx, outs):
                scores[i] = ruler.score(o.outputs[0].text, samples[i].answers)
                toks[i] = tokens(o, gen, eos)
                r["steps"].append(o.metrics.steps / gen)
        r["ruler"][n] = scores
        r["tokens"][n] = r["tokens"].get(n, []) + toks
    return r


def ruler_tasks_done(dense: dict, rulers: dict) -> dict:
    """length -> the tasks exact dense scores at least CAN_DO on."""
    out = {}
    for n, samples in rulers.items():
        by_task = {}
        for s, sc in zip(samples, dense["ruler"][n]):
            by_task.setdefault(s.task, []).append(sc)
        out[n] = [t for t, v in by_task.items() if sum(v) / len(v) >= CAN_DO]
    return out


def summarize(results: dict, rulers: dict, eos: int) -> tuple[str, list[str]]:
    """The markdown table and the notes under it (which RULER tasks count, which modes are flagged)."""
    dense = results[MODES[0].label]
    can_do = ruler_tasks_done(dense, rulers)
    lengths = list(dense["passkey_hits"])
    rl = list(rulers)
    head = ([f"passkey@{n} [95% CI]" for n in lengths] + [f"vs exact dense @{n} (pts, McNemar p)" for n in lengths]
            + [f"RULER@{n} [95% CI]" for n in rl] + [f"free agree@{n}" for n in dense["tokens"]]
            + ["steps / token", f"loses > {LOSS_POINTS:g} pts"])
    lines = ["| mode | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    flagged = []
    for label, r in results.items():
        cells = [accuracy_cell(h) for h in r["passkey_hits"].values()]
        drops = {}
        for n, h in r["passkey_hits"].items():
            d = dense["passkey_hits"][n]
            drops[n] = 100 * (sum(d) - sum(h)) / len(h)
            cells.append(f"{100 * (sum(h) - sum(d)) / len(h):+.1f} ({mcnemar_p(d, h):.2g})")
        for n in rl:
            keep = [sc for s, sc in zip(rulers[n], r["ruler"][n]) if s.task in can_do[n]]
            if keep:
                lo, hi = mean_interval(keep)
                m = sum(keep) / len(keep)
                cells.append(f"{100 * m:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
                dk = [sc for s, sc in zip(rulers[n], dense["ruler"][n]) if s.task in can_do[n]]
                drops[f"RULER@{n}"] = 100 * (sum(dk) - sum(keep)) / len(keep)
            else:
                cells.append("n/a")
        for n, toks in r["tokens"].items():
            cells.append(f"{100 * free_running_agreement(toks, dense['tokens'][n], eos):.1f}%")
        cells.append(f"{sum(r['steps']) / len(r['steps']):.3f}")
        lost = [f"{k if isinstance(k, str) else f'passkey@{k}'} {-v:+.1f}" for k, v in drops.items() if v > LOSS_POINTS]
        cells.append("**YES: " + ", ".join(lost) + "**" if lost else "no")
        if lost:
            flagged.append(f"{label}: " + ", ".join(lost))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"RULER tasks exact dense does at >= {100 * CAN_DO:.0f}% (the averages count these): "
             + "; ".join(f"@{n}: {', '.join(t) or 'none'}" for n, t in can_do.items())]
    return "\n".join(lines), notes + (["Modes losing more than 2 points vs exact dense: " + "; ".join(flagged)]
                                      if flagged else ["No mode loses more than 2 points vs exact dense."])


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in results.items():
        xs = list(r["passkey_hits"])
        ax.plot(xs, [100 * sum(h) / len(h) for h in r["passkey_hits"].values()],
                "--" if "threshold" in label else "-", marker="o", label=label)
    ax.set(xlabel="canvas length (tokens)", ylabel="passkey accuracy (%)", ylim=(-3, 103))
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--small", action="store_true", help="CPU scale: 256/512-token canvases, few samples")
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="model folder (default: the bundled model; e.g. benchmarks/long_fidelity.py's long-context one)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="passkey lengths (default: the scale's)")
    ap.add_argument("--ruler-lengths", type=int, nargs="*", default=None, help="RULER lengths (default: the scale's)")
    ap.add_argument("--block-size", type=int, default=None, help="SparseD's block size (default: the scale's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=None, help="passkey prompts per length")
    ap.add_argument("--ruler-samples", type=int, default=None, help="RULER samples per task and length")
    ap.add_argument("--ruler-tasks", nargs="*", default=["niah_single", "niah_multikey", "niah_multiquery"])
    ap.add_argument("--block", type=int, default=8, help="semi-AR block of every generation (divides 16, 32, 48)")
    ap.add_argument("--only", nargs="+", default=None, help="modes whose label contains one of these (exact "
                    "dense always runs)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no further mode after this many minutes (those left are listed as not run); "
                         "default 2.5 at full scale, none with --small")
    args = ap.parse_args()
    t0 = time.time()
    scale = SMALL if args.small else FULL
    scale = replace(
        scale, lengths=tuple(args.lengths or scale.lengths),
        ruler_lengths=tuple(scale.ruler_lengths if args.ruler_lengths is None else args.ruler_lengths),
        sparse={**scale.sparse, **({} if args.block_size is None else {"block_size": args.block_size})})
    if args.max_minutes is None and not args.small:
        args.max_minutes = 2.5
    samples = args.samples or scale.samples
    ruler_samples = args.ruler_samples or scale.ruler_samples
    modes = [m for m in MODES if m is MODES[0] or not args.only or any(o in m.label for o in args.only)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    tokenizer = load_tokenizer(model)
    stream = heldout_stream(tokenizer)
    passkeys = {n: passkey_prompts(tokenizer, stream, n, samples, PASSKEY_GEN, n) for n in scale.lengths}
    rulers = {n: ruler.build_samples(tokenizer, n, ruler_samples, 0, args.ruler_tasks) for n in scale.ruler_lengths}
    longest = max(scale.lengths + scale.ruler_lengths)
    batch = max(samples, ruler_samples)
    cuda = args.device.startswith("cuda")
    llm = LLM(model=model, device=args.device, attention_backend="sparsed", attention_config=scale.sparse,
              max_model_len=longest, max_num_seqs=batch, max_num_batched_tokens=batch * longest,
              mask_pool_bytes=1 << 27, mask_pool_block_bytes=4096,
              kv_cache_bytes=kv_pool_bytes(model, longest, batch, 2 if cuda else 4))
    eos = min(llm.llm_engine.eos_token_ids)
    results, skipped = {}, []
    for mode in modes:
        if args.max_minutes is not None and results and (time.time() - t0) / 60 > args.max_minutes:
            skipped.append(mode.label)
            continue
        t = time.time()
        results[mode.label] = run_mode(llm, mode, passkeys, rulers, scale, args.block)
        acc = {n: f"{100 * sum(h) / len(h):.1f}%" for n, h in results[mode.label]["passkey_hits"].items()}
        print(f"{mode.label}: passkey {acc} ({time.time() - t:.0f} s)", flush=True)
    llm.shutdown()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    sp = ", ".join(f"{k} {v}" for k, v in scale.sparse.items())
    name = "bundled default model" if Path(model).resolve() == DEFAULT_MODEL.resolve() else Path(model).name
    title = (f"KV-cache fidelity, {'small' if args.small else 'full'} scale, {name}, {device}, "
             f"torch {torch.__version__}, {datetime.date.today()}")
    md, notes = summarize(results, rulers, eos)
    k = int(PASSKEY_GEN * scale.sparse["skip"]) + 1
    notes.append(f"SparseD on a {PASSKEY_GEN}-token passkey answer: exact mode selects at step {k}; cache modes at "
                 f"the first refresh at or after it, step {-(-k // args.block) * args.block} (refreshes every "
                 f"{args.block} steps), so a cache mode's first block is decoded with dense attention.")
    text = "\n".join([f"### {title}", "",
                      f"{samples} passkey prompts per length ({PASSKEY_GEN} tokens), RULER tasks "
                      f"{', '.join(args.ruler_tasks)} with {ruler_samples} samples each per length; greedy, one "
                      f"token a step, blocks of {args.block}; SparseD {sp}. Agreement: free-running greedy token "
                      f"agreement with exact dense over all outputs at that length (secondary measure). "
                      f"\"steps / token\": denoising steps a request took per generated token (1.0 without "
                      f"threshold decoding).", "", md, "", *notes]
                     + ([f"Not run (--max-minutes {args.max_minutes}): {', '.join(skipped)}"] if skipped else [])
                     + [f"Total {time.time() - t0:.0f} s."]) + "\n"
    print("\n" + text)
    (out / "kv_fidelity.md").write_text(text)
    (out / "kv_fidelity.json").write_text(json.dumps({"title": title, "results": results, "skipped": skipped},
                                                     default=str))
    plot(results, out / "kv_fidelity.png", title)


if __name__ == "__main__":
    main()
