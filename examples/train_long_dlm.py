"""Train the long-context fidelity model: the project's LLaDA architecture and objective
(examples/train_tiny_dlm.py) at ~30M parameters (d_model 512, 8 layers, 8 heads of 64), first at
2k tokens, then at 8k-16k with the RoPE base raised, so that SparseD can be judged where it lives.

Corpus: the interpreter's standard-library sources minus the held-out files
(sparsed_engine/evaluation/heldout.py), tokenized with the bundled model's tokenizer; nothing is
downloaded. Half of the rows (--retrieval-fraction) are retrieval documents, half of them
train_tiny_dlm's passkey / key-value lookups in corpus filler, half the RULER-style suite's own tasks
(sparsed_engine/evaluation/ruler.py: noise haystack, random depths) with their answers; as in
LLaDA's SFT only the answer is masked. Fixed seed; the log is the provenance.

Time-boxed: --max-minutes splits into --long-share for the long phase and the rest at --seq-len.

    python -m examples.train_long_dlm --out /tmp/long-llada --max-minutes 5.5          # one H200
    python -m examples.train_long_dlm --out /tmp/t --device cpu --toy                    # CPU smoke
(from the repository root; benchmarks/long_fidelity.py trains with it and evaluates in one command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from examples.train_tiny_dlm import (RowsSDPA, TrainingData, attention_entropy, init_weights, llada_config,
                                     llada_loss, require_gradients, retrieval_probe, save_checkpoint)
from model_executor.models.llada import LLaDAModelLM
from sparsed_engine.evaluation.heldout import stdlib_documents
from sparsed_engine.evaluation.ruler import GEN, TASKS, make_sample
from sparsed_engine.llm import DEFAULT_MODEL


class _Encoder:
    """The `encode(text, add_special_tokens=False) -> ids` the task suite expects, over `tokenizers`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


class LongTrainingData(TrainingData):
    """TrainingData whose retrieval rows are half the suite's tasks (answers after the question)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder, self.task_rng = _Encoder(self.tok), random.Random(self.keys.random())

    def retrieval_doc(self, length: int) -> tuple[list[int], int]:
        if self.rng.random() < 0.5:
            return super().retrieval_doc(length)
        task = self.task_rng.choice(TASKS)
        try:
            sample = make_sample(self.encoder, task, length, self.task_rng)
        except ValueError:   # too short for this task's needles and question
            return super().retrieval_doc(length)
        answer = self.enc(" " + ", ".join(sample.answers) + ".")[:GEN[task]]
        answer += [self.eos] * (GEN[task] - len(answer))
        return sample.prompt_ids + answer, GEN[task]


def stdlib_tokens(tok: Tokenizer) -> np.ndarray:
    eos = tok.token_to_id("<|endoftext|>")
    docs = stdlib_documents()
    random.Random(0).shuffle(docs)
    return np.asarray([i for enc in tok.encode_batch(docs) for i in enc.ids + [eos]], dtype=np.uint16)


def warm_start(model: LLaDAModelLM, src: Path) -> None:
    """Every weight from the checkpoint in `src` (strict: the architecture must be the same)."""
    weights = {}
    for shard in sorted(src.glob("*.safetensors")):
        weights |= load_file(str(shard))
    if not weights:
        raise FileNotFoundError(f"--init-from {src}: no *.safetensors there")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)


def train(args, log=print) -> Path:
    """Both phases, then the checkpoint in args.out; returns it."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    source = Path(args.init_from) if args.init_from else DEFAULT_MODEL   # tokenizer (and weights if warm)
    missing = [name for name in ("config.json", "tokenizer.json") if not (source / name).is_file()]
    if args.init_from and missing:   # before the corpus is tokenized
        raise FileNotFoundError(f"--init-from {args.init_from}: no {' or '.join(missing)} there (a checkpoint folder)")
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    t_data = time.time()
    data = LongTrainingData(stdlib_tokens(tok), tok, args.retrieval_fraction, args.seed)
    log(f"corpus: {len(data.tokens) / 1e6:.1f}M stdlib tokens ({time.time() - t_data:.0f}s to tokenize)")
    args.max_len = args.long_len
    args.rope_theta = args.rope_theta_long   # what config.json states: the final model's base
    if args.init_from:   # the source's architecture; only the context length and RoPE base change
        config = json.loads((source / "config.json").read_text()) | {
            "max_sequence_length": args.long_len, "rope_theta": args.rope_theta_long}
    else:
        config = llada_config(args, tok)
    mask_id = config["mask_token_id"]
    model = LLaDAModelLM(config, RowsSDPA(LLaDAModelLM.attention_layout(config), device, torch.bfloat16))
    model.args = dataclasses.replace(model.args, rope_theta=args.rope_theta_short)
    if args.init_from:
        warm_start(model, source)
        log(f"warm start from {source} (d_model {config['d_model']}, {config['n_layers']} layers)")
    else:
        init_weights(model, args.n_layers, args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params / 1e6:.1f}M, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    loss_fn = torch.compile(llada_loss, dynamic=False) if use_compile else llada_loss
    budget = args.max_minutes * 60
    phases = [("short", args.seq_len, args.batch_size, args.rope_theta_short, budget * (1 - args.long_share)),
              ("long", args.long_len, max(1, args.batch_size * args.seq_len // args.long_len), args.rope_theta_long,
               budget * args.long_share)]
    t0, step = time.time(), 0
    for name, length, rows, theta, seconds in phases:
        model.args = dataclasses.replace(model.args, rope_theta=theta)
        start, running, phase_steps = time.time(), [], 0
        log(f"phase {name}: rows of {length} tokens x {rows}, RoPE base {theta:g}, {seconds:.0f}s")
        while time.time() - start < seconds and (args.steps is None or phase_steps < args.steps):
            # linear warm-up, then cosine to 10% over the whole time box
            frac = min((time.time() - t0) / budget, 1.0)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            ids, region, norm = (x.to(device, non_blocking=True) for x in data.batch(rows, length))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                per_row = loss_fn(model, ids, region, norm, mask_id)
            per_row.mean().backward()
            if step == 0:
                require_gradients(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            phase_steps += 1
            corpus_rows = region.all(1)
            running.append(torch.stack([(per_row * corpus_rows).sum(), corpus_rows.sum(),
                                        (per_row * ~corpus_rows).sum(), (~corpus_rows).sum()]).detach())
            if step % args.log_every == 0:
                lm, n_lm, ret, n_ret = torch.stack(running).sum(0).tolist()
                log(f"step {step:5d} [{name}]  loss: corpus {lm / max(n_lm, 1):.3f} retrieval "
                    f"{ret / max(n_ret, 1):.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s")
                running = []
    model.eval()
    for length in sorted({args.seq_len, args.long_len}):
        log(f"retrieval probe (one forward, answer masked) at {length}: "
            f"{retrieval_probe(model, data, length, 16, mask_id, device):.2f}")
    row = data.batch(1, min(1024, args.seq_len))[0][0].to(device)
    log("attention entropy per layer: " + " ".join(f"{e:.2f}" for e in attention_entropy(model, row, mask_id)))
    out = Path(args.out)
    save_checkpoint(model, config, tok, source, out, args.shard_mb)
    log(f"saved {out} after {step} steps, {time.time() - t0:.0f}s")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--init-from", default=None,
                    help="warm start: a checkpoint folder whose architecture, weights and tokenizer are "
                         "extended to --long-len (the --d-model/--n-layers/--mlp-hidden sizes are then unused)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--mlp-hidden", type=int, default=1536)
    ap.add_argument("--seq-len", type=int, default=2048, help="rows of the first phase")
    ap.add_argument("--long-len", type=int, default=16384, help="rows of the second phase (and max_sequence_length)")
    # Retrieval is learned in a sudden transition after enough optimizer steps (the 12M model's came
    # at ~5,000 steps, sparsed_engine/default_model/training_log.txt); at 32 rows a step the 5-minute
    # box gave ~3,800 short steps and the retrieval loss sat on its plateau (~1.0), so the defaults
    # trade rows per step for steps and put more of each batch into retrieval rows.
    ap.add_argument("--batch-size", type=int, default=16, help="rows per step at --seq-len (the long phase keeps the tokens)")
    ap.add_argument("--rope-theta-short", type=float, default=10000.0)
    ap.add_argument("--rope-theta-long", type=float, default=160000.0)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--retrieval-fraction", type=float, default=0.5)
    ap.add_argument("--max-minutes", type=float, default=5.5, help="both phases together")
    ap.add_argument("--long-share", type=float, default=0.3, help="share of the time in the long phase")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps a phase (smoke runs)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--shard-mb", type=float, default=15.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--toy", action="store_true", help="CPU smoke size: d_model 64, 2 layers, rows of 256/512")
    return ap


def apply_toy(args) -> None:
    args.d_model, args.n_layers, args.mlp_hidden = 64, 2, 128
    args.seq_len, args.long_len, args.batch_size, args.log_every = 256, 512, 4, 2
    args.steps = args.steps or 4
    args.warmup = 2


def main() -> None:
    args = parser().parse_args()
    if args.toy:
        apply_toy(args)
    train(args)


if __name__ == "__main__":
    main()
