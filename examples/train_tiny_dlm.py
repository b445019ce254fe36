"""Train a small LLaDA-architecture masked diffusion LM from scratch and save it as an LLaDA folder.

The model is the engine's own `LLaDAModelLM` (so parameter names, RoPE and norms are exactly what
the loader reads back), run here through a training-only attention backend that treats the
packed batch as equal-length rows and calls SDPA once per layer.

Objective (LLaDA, Nie et al. 2025):
  * corpus rows: per row t ~ U(eps, 1), every token masked with probability t, cross-entropy on
    the masked tokens weighted by 1/t, summed and divided by the row length (pre-training loss);
  * retrieval rows (RULER-style, generated on the fly): a needle "The pass key is 71432.
    Remember it." (or several "The secret number of NAME is 48213." pairs) at random depths of
    corpus filler, then "What is the pass key? The pass key is" and the answer padded with
    <|endoftext|>. As in LLaDA's SFT only the answer is masked (probability t), and the loss is
    divided by the answer's length. Rows are 2,048 tokens, every fourth step 4,096 (so RoPE
    sees the distances the 4k fidelity test uses); a retrieval document, of log-uniform length
    from 128 tokens to the row, ends the row after a corpus prefix.

Training is bf16 autocast with torch.compile on CUDA (one static graph per row shape), AdamW
(0.9, 0.95), weight decay 0.1 on matrices, linear warm-up then cosine decay to 10% (over --steps,
or over --max-minutes when that runs out first). Each log line splits the loss into corpus and
retrieval rows and gives each layer's attention entropy on a fixed row (near zero = collapsed
heads, see --lr); the run ends with a retrieval probe and the same entropy check.

The saved folder is what the engine loads (official key names; bf16 safetensors in shards of at
most --shard-mb, an index, tokenizer files and generation_config.json); the run ends by
generating from it through `LLM`.

    python examples/build_corpus.py --out .corpus
    python examples/train_tiny_dlm.py --corpus .corpus --out /tmp/tiny-llada --max-minutes 7.4  # one H100/H200
    python examples/train_tiny_dlm.py --corpus .corpus --out /tmp/t --device cpu \
        --d-model 64 --n-layers 2 --mlp-hidden 128 --seq-len 256 --batch-size 4 --steps 4  # CPU smoke
(run from the repository root after `pip install -e .`; elsewhere set PYTHONPATH to it). The first
line made the bundled default: 11,500 steps in 368 s on an H200 (sparsed_engine/default_model/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from attention_backends.base import AttentionBackend
from model_executor.models.llada import LLaDAModelLM
from sparsed_engine.evaluation.templates import (ANSWER, KV_NAMES, KV_NEEDLE, KV_QUESTION, PASSKEY_NEEDLE,
                                                 PASSKEY_QUESTION, passkey)

class RowsSDPA(AttentionBackend):
    """Training only: the packed batch is `rows` equal-length rows; one bidirectional SDPA call."""
    name = "rows_sdpa"

    def build_metadata(self, rows):
        return rows

    def forward(self, q, k, v, rows: int, layer: int):
        t, h, d = q.shape
        qh, kh, vh = (x.view(rows, t // rows, -1, d).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=self.layout.scale)
        return out.transpose(1, 2).reshape(t, h, d)


def llada_config(args, tok: Tokenizer) -> dict:
    """config.json with the official LLaDA key names and values (only the sizes differ)."""
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mdm_mask|>")
    heads = max(args.d_model // 64, 1)  # heads of 64 dims, as in LLaDA-8B (4096 / 32)
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "torch_dtype": "bfloat16",
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": args.d_model, "embedding_dropout": 0.0, "embedding_size": tok.get_vocab_size(),
        "eos_token_id": eos, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_device": "meta", "init_fn": "normal", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": mask,
        "max_sequence_length": args.max_len, "mlp_hidden_size": args.mlp_hidden,
        "mlp_ratio": args.mlp_hidden // args.d_model, "multi_query_attention": None,
        "n_heads": heads, "n_kv_heads": heads, "n_layers": args.n_layers,
        "pad_token_id": eos, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5,
        "rope": True, "rope_full_precision": True, "rope_theta": args.rope_theta, "scale_logits": False,
        "use_cache": False, "vocab_size": tok.get_vocab_size(), "weight_tying": False,
    }


class TrainingData:
    """Training rows: corpus windows and retrieval documents, as token ids plus a loss region."""

    def __init__(self, tokens: np.ndarray, tok: Tokenizer, retrieval_fraction: float, seed: int):
        self.tokens, self.tok, self.frac = tokens, tok, retrieval_fraction
        self.rng, self.keys = np.random.default_rng(seed), random.Random(seed)
        self.eos = tok.token_to_id("<|endoftext|>")
        # Filler is cut and needles are inserted only before a space-led token, so the ids equal
        # what tokenizing the decoded text gives (byte-level BPE never merges across a space).
        space_led = np.array([tok.id_to_token(i).startswith("Ġ") for i in range(tok.get_vocab_size())])
        self.cuts = np.flatnonzero(space_led[tokens])

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def _start(self, n: int) -> int:
        """A random space-led position with n tokens after it."""
        return int(self.cuts[self.rng.integers(np.searchsorted(self.cuts, len(self.tokens) - n))])

    def _window(self, n: int) -> np.ndarray:
        s = self._start(n)
        return self.tokens[s:s + n].astype(np.int64)

    def _filler_with(self, needles: list[list[int]], n: int) -> list[int]:
        """n filler tokens with the needles inserted at random depths (before space-led tokens)."""
        start = self._start(n)
        lo, hi = np.searchsorted(self.cuts, [start, start + n])
        points = sorted(min(int(self.cuts[self.rng.integers(lo, max(hi, lo + 1))]) - start, n) for _ in needles)
        filler = self.tokens[start:start + n].tolist()
        out, prev = [], 0
        for p, needle in zip(points, needles):
            out += filler[prev:p] + needle
            prev = p
        return out + filler[prev:]

    def retrieval_doc(self, length: int) -> tuple[list[int], int]:
        """(ids, answer length): a passkey or key-value lookup document of exactly `length` ids."""
        if self.rng.random() < 0.7:
            key = passkey(self.keys)
            needles, question = [self.enc(PASSKEY_NEEDLE.format(key=key))], self.enc(PASSKEY_QUESTION)
        else:
            names = self.keys.sample(KV_NAMES, int(self.rng.integers(2, 7)))
            keys = [passkey(self.keys) for _ in names]
            needles = [self.enc(KV_NEEDLE.format(name=n, key=k)) for n, k in zip(names, keys)]
            j = int(self.rng.integers(len(names)))
            key, question = keys[j], self.enc(KV_QUESTION.format(name=names[j]))
        answer = self.enc(ANSWER.format(key=key)) + [self.eos] * int(self.rng.integers(1, 25))
        n_filler = length - sum(map(len, needles)) - len(question) - len(answer)
        ids = self._filler_with(needles, max(n_filler, 0)) + question + answer
        return ids[-length:], len(answer)

    def batch(self, rows: int, length: int):
        """ids [rows, length] int64, region bool [rows, length] (where the loss may fall), and each
        row's normaliser (its length for corpus rows, its answer length for retrieval rows)."""
        ids = np.empty((rows, length), dtype=np.int64)
        region = np.ones((rows, length), dtype=bool)
        norm = np.full(rows, float(length))
        for r in range(rows):
            if self.rng.random() >= self.frac:
                ids[r] = self._window(length)
                continue
            # log-uniform lengths: short documents, where the needle is easy to find, teach the
            # lookup; long ones teach it across the whole context
            low = min(128, length)
            doc_len = int(np.exp(self.rng.uniform(np.log(low), np.log(length + 1))))
            doc, n_ans = self.retrieval_doc(doc_len)
            prefix = self._window(length - doc_len)
            if len(prefix):
                prefix[-1] = self.eos  # an unrelated document ends before this one starts
            ids[r] = np.concatenate([prefix, doc])
            region[r] = False
            region[r, length - n_ans:] = True
            norm[r] = n_ans
        return torch.from_numpy(ids), torch.from_numpy(region), torch.from_numpy(norm).float()


def llada_loss(model: LLaDAModelLM, ids, region, norm, mask_id: int, eps: float = 1e-3):
    """LLaDA's masked-diffusion loss of each row (the training loss is their mean)."""
    rows, length = ids.shape
    t = eps + (1 - eps) * torch.rand(rows, 1, device=ids.device)
    masked = (torch.rand(rows, length, device=ids.device) < t) & region
    noisy = torch.where(masked, mask_id, ids).flatten()
    positions = torch.arange(length, device=ids.device).repeat(rows)
    hidden = model(noisy, positions, rows)
    logits = model.compute_logits(hidden, torch.arange(rows * length, device=ids.device))
    ce = F.cross_entropy(logits, ids.flatten(), reduction="none").view(rows, length)
    return (ce * masked / t).sum(1) / norm


@torch.no_grad()
def retrieval_probe(model, data: TrainingData, length: int, n: int, mask_id: int, device) -> float:
    """Share of retrieval documents whose whole answer is right from ONE forward with the answer
    fully masked (a strict lower bound on what iterative decoding gets)."""
    hits = 0
    for _ in range(n):
        doc, n_ans = data.retrieval_doc(length)
        ids = torch.tensor(doc, device=device)
        noisy = ids.clone()
        noisy[-n_ans:] = mask_id
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(noisy, torch.arange(length, device=device), 1)
        answer = torch.arange(length - n_ans, length, device=device)
        answer = answer[ids[answer] != data.eos]  # the key and its full stop, not the padding
        hits += bool((model.compute_logits(hidden, answer).argmax(-1) == ids[answer]).all())
    return hits / n


class EntropyProbe(RowsSDPA):
    """RowsSDPA that also records each layer's mean attention entropy (one row, float32)."""
    name = "entropy_probe"

    def __init__(self, layout, device, dtype):
        super().__init__(layout, device, dtype)
        self.entropies: list[float] = []

    def forward(self, q, k, v, rows: int, layer: int):
        p = (torch.einsum("qhd,khd->hqk", q.float(), k.float()) * self.layout.scale).softmax(-1)
        self.entropies.append(-(p * p.clamp_min(1e-30).log()).sum(-1).mean().item())
        return super().forward(q, k, v, rows, layer)


@torch.no_grad()
def attention_entropy(model: LLaDAModelLM, ids: torch.Tensor, mask_id: int) -> list[float]:
    """Per-layer attention entropy on a corpus row with 15% of it masked. Near 0 means every head
    points at a single key: the collapse a too-high learning rate caused in this architecture."""
    blocks = model.model.transformer.blocks
    probe = EntropyProbe(model.backend.layout, ids.device, torch.float32)
    for block in blocks:
        block.backend = probe
    noisy = torch.where(torch.rand(ids.shape, device=ids.device) < 0.15, mask_id, ids)
    model(noisy, torch.arange(len(ids), device=ids.device), 1)
    for block in blocks:
        block.backend = model.backend
    return probe.entropies


def save_checkpoint(model, config: dict, tok: Tokenizer, corpus: Path, out: Path, shard_mb: float) -> None:
    """bf16 safetensors shards of at most shard_mb each."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_mb * 1e6:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.token_to_id("<|startoftext|>"), "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"], "mask_token_id": config["mask_token_id"],
         "remasking": "low_confidence"}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(corpus / name, out / name)


def require_gradients(model: torch.nn.Module) -> None:
    """After the first backward: every parameter must have a gradient. A layer whose forward
    runs a kernel without a backward cuts the graph; the run then fits only what lies above it
    (once only the LM head: unigram loss and uniform attention for 8,000 steps)."""
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached {len(missing)} parameters, e.g. {missing[:3]}")


def init_weights(model: LLaDAModelLM, n_layers: int, seed: int) -> None:
    """N(0, 0.02) everywhere, residual outputs scaled by 1/sqrt(2 * layers) (GPT-2 style)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            continue  # norm weights stay 1
        residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
        std = 0.02 / math.sqrt(2 * n_layers) if residual_out else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".corpus", help="output folder of build_corpus.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--mlp-hidden", type=int, default=768)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--max-len", type=int, default=4096, help="max_sequence_length in config.json")
    ap.add_argument("--seq-len", type=int, default=2048, help="row length; every 4th step uses 2x")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per step at --seq-len")
    ap.add_argument("--steps", type=int, default=11500)
    # 3e-3 let the attention logits grow until every head was one-hot (entropy collapse, no
    # qk-norm in this architecture) and the model stopped using its context; 1e-3 is Pythia's
    # rate at this size.
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--retrieval-fraction", type=float, default=0.35)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (and still save) after this")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the loss (default: on CUDA)")
    ap.add_argument("--shard-mb", type=float, default=15.0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    corpus, out = Path(args.corpus), Path(args.out)
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    data = TrainingData(np.load(corpus / "tokens.npy"), tok, args.retrieval_fraction, args.seed)
    config = llada_config(args, tok)
    mask_id = config["mask_token_id"]
    layout = LLaDAModelLM.attention_layout(config)
    model = LLaDAModelLM(config, RowsSDPA(layout, device, torch.bfloat16))
    init_weights(model, args.n_layers, args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M ({n_params * 2 / 1e6:.1f} MB in bf16), corpus "
          f"{len(data.tokens) / 1e6:.1f}M tokens, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")

    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    # Cosine over training progress: the step count, or, with --max-minutes, the elapsed share of
    # that budget when it is further along, so a time-limited run still decays to 10% at its end
    # instead of stopping at a high learning rate.
    t_start = [time.time()]

    def progress(s: int) -> float:
        by_time = (time.time() - t_start[0]) / (args.max_minutes * 60) if args.max_minutes else 0.0
        return min(max(s / args.steps, by_time), 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * progress(s)))))
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    # dynamic=False: the two row shapes get one static graph each instead of a dynamic one
    loss_fn = torch.compile(llada_loss, dynamic=False) if use_compile else llada_loss

    probe_row = data.batch(1, min(1024, args.seq_len))[0][0].to(device)  # fixed row for the entropy log
    t0, running = time.time(), []
    t_start[0] = t0
    t_log, tokens_since = t0, 0
    for step in range(args.steps):
        rows, length = (args.batch_size // 2, args.seq_len * 2) if step % 4 == 3 else (args.batch_size, args.seq_len)
        ids, region, norm = (x.to(device, non_blocking=True) for x in data.batch(rows, length))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            per_row = loss_fn(model, ids, region, norm, mask_id)
        per_row.mean().backward()
        if step == 0:
            require_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        tokens_since += rows * length
        corpus_rows = region.all(1)
        running.append(torch.stack([(per_row * corpus_rows).sum(), corpus_rows.sum(),
                                    (per_row * ~corpus_rows).sum(), (~corpus_rows).sum()]).detach())
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            lm, n_lm, ret, n_ret = torch.stack(running).sum(0).tolist()  # synchronises
            now = time.time()
            # attention entropy per layer on a fixed row: falling towards 0 is the collapse to
            # one-hot heads that --lr 3e-3 caused (uniform is log(row length), ~6.9 at 1,024)
            entropy = attention_entropy(model, probe_row, mask_id)
            print(f"step {step + 1:5d}  loss: corpus {lm / max(n_lm, 1):.3f} retrieval {ret / max(n_ret, 1):.3f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  attn entropy {' '.join(f'{e:.1f}' for e in entropy)}"
                  f"{'  COLLAPSING' if min(entropy) < 0.5 else ''}  "
                  f"{tokens_since / (now - t_log) / 1e3:.0f}k tok/s  {now - t0:.0f}s", flush=True)
            running, t_log, tokens_since = [], time.time(), 0
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break

    model.eval()
    for length in sorted({min(1024, args.seq_len), args.seq_len, 2 * args.seq_len}):
        acc = retrieval_probe(model, data, length, 32, mask_id, device)
        print(f"retrieval probe (one forward, answer fully masked) at {length} tokens: {acc:.2f}")
    row = data.batch(1, min(1024, args.seq_len))[0][0].to(device)
    entropy = attention_entropy(model, row, mask_id)
    print(f"attention entropy per layer (nats; uniform is {math.log(len(row)):.1f}): "
          + " ".join(f"{e:.2f}" for e in entropy) + ("  COLLAPSED" if min(entropy) < 0.5 else ""))
    save_checkpoint(model, config, tok, corpus, out, args.shard_mb)
    print(f"saved {out} in {time.time() - t0:.0f}s total")

    from sparsed_engine import LLM, SamplingParams
    llm = LLM(model=str(out), device=str(device))
    sample = llm.generate("The history of", SamplingParams(max_tokens=48, steps=48, block_length=16),
                          use_tqdm=False)[0].outputs[0].text
    print(f"sample: The history of{sample!r}")


if __name__ == "__main__":
    main()
