"""The fidelity measures, each taken the way generation works.

* `masked_nll`: held-out windows, the first half clean (the prompt), the second half (the
  generation region) masked by a nested schedule: a fixed random order of its positions, the first
  `round(r * G)` of them masked at ratio r, so a lower ratio is a later step of one generation of
  `steps` steps (ratio r is step `int(steps * (1 - r))`). A setting's phase at that step decides
  how the scored pass runs: dense before the selection step (and at it); sparse after it, with the
  pattern chosen (a SELECT pass) on the canvas of the selection step itself, the one the backend's
  own schedule picks (SparseD: `int(steps * skip) + 1`, the step-0 ablation: step 0, fully masked).
  So `skip` matters, and sparse-from-step-0 differs from SparseD.
* `teacher_forced_agreement`: a dense greedy low-confidence trajectory (LLaDA's: semi-autoregressive
  blocks, `block` tokens committed over `steps * block / gen` steps) is recorded once; each setting
  then runs every step on the dense trajectory's canvas with its own phase at that step, and is
  compared at the positions dense committed there: top-1 equal to dense's token, and
  KL(dense || setting) of the two distributions. One early difference cannot change what follows.
* `continuations`: free-running greedy generation (the secondary measure; one changed token
  changes all that follow it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention_backends.base import DENSE, SELECT, SPARSE, RowSpec
from model_executor.step_input import RowInput, StepInput
from sparsed_engine import LLM, SamplingParams


@dataclass(frozen=True)
class Setting:
    label: str
    backend: str
    attention_config: dict | None = None
    dtype: str = "auto"     # "other": float32 on GPU, bfloat16 on CPU (the rounding baseline)


def make_llm(model: str, setting: Setting, device: str, max_model_len: int) -> LLM:
    dtype = setting.dtype if setting.dtype != "other" else "float32" if device.startswith("cuda") else "bfloat16"
    return LLM(model=model, device=device, dtype=dtype, attention_backend=setting.backend,
               attention_config=setting.attention_config, max_model_len=max_model_len,
               mask_pool_bytes=1 << 27, mask_pool_block_bytes=4096, max_num_seqs=256,
               max_num_batched_tokens=1 << 21)


# ---------------------------------------------------------------- generation
def first_number_hits(llm: LLM, prompts, gen: int) -> list[bool]:
    """Per prompt: the first number generated (greedy, one token a step, one block) equals the key."""
    params = SamplingParams(max_tokens=gen, steps=gen, block_length=gen, temperature=0.0, seed=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in prompts], params, use_tqdm=False)
    hits = []
    for out, (_, key) in zip(outs, prompts):
        number = re.search(r"\d+", out.outputs[0].text)
        hits.append(number is not None and number.group() == key)
    return hits


def passkey_accuracy(llm: LLM, prompts, gen: int) -> float:
    hits = first_number_hits(llm, prompts, gen)
    return sum(hits) / len(hits)


def continuations(llm: LLM, prompts: list[list[int]], gen: int, block: int) -> list[list[int]]:
    """Greedy continuations, padded with EOS to `gen` tokens (the engine cuts at the first EOS)."""
    params = SamplingParams(max_tokens=gen, steps=gen, block_length=block, temperature=0.0, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    eos = min(llm.llm_engine.eos_token_ids)
    return [list(o.outputs[0].token_ids) + [eos] * (gen - len(o.outputs[0].token_ids)) for o in outs]


def free_running_agreement(outs: list[list[int]], dense: list[list[int]], eos: int) -> float:
    """Share of generated positions equal to dense's, over positions either run generated (the
    EOS padding both carry after their end of text is not counted as agreement)."""
    same = total = 0
    for o, d in zip(outs, dense):
        n = len(o)
        while n and o[n - 1] == d[n - 1] == eos:
            n -= 1
        same += sum(a == b for a, b in zip(o[:n], d[:n]))
        total += n
    return same / total if total else 1.0


# ---------------------------------------------------------------- pattern bookkeeping
class _Patterns:
    """Pool blocks for the rows of a hand-built step sequence; freed on exit."""

    def __init__(self, llm: LLM, setting: Setting, lengths: list[int], total_steps: int, tag: str):
        engine = llm.llm_engine
        self.backend_cls, self.bm = engine.backend_cls, engine.scheduler.block_manager
        self.cfg = self.backend_cls.resolve_config(setting.attention_config)
        self.total_steps, self.ids = total_steps, [f"{tag}{i}" for i in range(len(lengths))]
        self.blocks = []
        for rid, n in zip(self.ids, lengths):
            need = self.backend_cls.pattern_blocks_needed(engine.layout, n, self.cfg, self.bm.block_bytes, total_steps)
            self.bm.reserve(rid, need)
            self.blocks.append(self.bm.allocate(rid) if need else ())

    def phase(self, step: int) -> str:
        if not self.blocks or not self.blocks[0]:
            return DENSE
        return self.backend_cls.phase(step, self.total_steps, self.cfg)

    def select_step(self) -> int | None:
        return next((s for s in range(self.total_steps) if self.phase(s) == SELECT), None)

    def spec(self, i: int, length: int, prompt_len: int, phase: str) -> RowSpec:
        if phase == DENSE:
            return RowSpec(length, prompt_len, DENSE)
        return RowSpec(length, prompt_len, phase, self.blocks[i], self.cfg)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for rid in self.ids:
            self.bm.free(rid)


def pattern_density(llm: LLM, patterns: _Patterns, lengths: list[int], prompt_lens: list[int]) -> dict:
    """Kept tiles / all tiles of the patterns just selected: {"density": over every layer, head and
    row, "head_density": [layer][head] over the rows}; single-process engines only, where the
    worker's backend is in reach."""
    backend = llm.llm_engine.executor.worker.backend
    meta = backend.build_metadata([patterns.spec(i, n, p, SPARSE) for i, (n, p) in enumerate(zip(lengths, prompt_lens))])
    layout = backend.layout
    kept = torch.zeros(layout.num_layers, layout.num_heads)
    total = 0
    for row in meta.rows:
        for layer in range(layout.num_layers):
            tiles = backend.load_tiles(row, layer)                # [H, nb, nb]
            kept[layer] += tiles.flatten(1).sum(1).float().cpu()
        total += tiles[0].numel()
    return {"density": kept.sum().item() / (total * layout.num_layers * layout.num_heads),
            "head_density": (kept / total).tolist()}


# ---------------------------------------------------------------- NLL
def nested_order(n: int, seed: int) -> torch.Tensor:
    """rank[j]: position j of the generation region is masked at ratio r when rank[j] < round(r * n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).argsort()


def masked_nll(llm: LLM, setting: Setting, docs: list[list[int]], ratio: float, seed: int,
               steps: int = 64, density: dict | None = None) -> float:
    """Mean NLL of the masked tokens of the docs' second halves at mask ratio `ratio` (module doc).
    `density`, when given, receives the achieved pattern density under "density" and per layer
    and head under "head_density" (pattern_density)."""
    engine = llm.llm_engine
    mask_id = engine.info.mask_token_id
    lengths = [len(d) for d in docs]
    halves = [n // 2 for n in lengths]

    def canvas(i: int, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        ids, half = torch.tensor(docs[i]), halves[i]
        rank = nested_order(len(ids) - half, seed + i)
        masked = torch.zeros(len(ids), dtype=torch.bool)
        masked[half:] = rank < round(r * (len(ids) - half))
        return torch.where(masked, mask_id, ids), masked.nonzero().squeeze(-1)

    scored = [canvas(i, ratio) for i in range(len(docs))]
    targets = torch.cat([torch.tensor(d)[pos] for d, (_, pos) in zip(docs, scored)])
    with _Patterns(llm, setting, lengths, steps, "nll") as pat:
        at = pat.select_step()
        phase = pat.phase(min(int(steps * (1 - ratio)), steps - 1))
        if phase == SPARSE:
            sel_ratio = 1 - at / steps
            select_rows = [RowInput(canvas(i, sel_ratio)[0], torch.tensor([halves[i]]),
                                    pat.spec(i, n, halves[i], SELECT))
                           for i, n in enumerate(lengths)]
            engine.executor.execute(StepInput(select_rows))
            if density is not None:
                density.update(pattern_density(llm, pat, lengths, halves))
        else:
            phase = DENSE
        rows = [RowInput(c, pos, pat.spec(i, n, halves[i], phase))
                for i, ((c, pos), n) in enumerate(zip(scored, lengths))]
        logits = engine.executor.execute(StepInput(rows))
    return F.cross_entropy(torch.cat([lg.float().cpu() for lg in logits]), targets).item()


# ---------------------------------------------------------------- teacher-forced agreement
@dataclass
class Trajectory:
    """A recorded dense greedy run: per step, the canvases it ran on, the positions it committed
    there (per row) and dense's log-probabilities at those positions."""
    prompt_len: int
    length: int
    canvases: list[list[torch.Tensor]]
    committed: list[list[torch.Tensor]]
    logprobs: list[list[torch.Tensor]]


def transfer_counts(block: int, steps_per_block: int) -> list[int]:
    """LLaDA's schedule: `block` tokens over the block's steps, the remainder on the first steps."""
    base, rem = divmod(block, steps_per_block)
    return [base + (i < rem) for i in range(steps_per_block)]


def dense_trajectory(llm: LLM, prompts: list[list[int]], gen: int, block: int, steps: int) -> Trajectory:
    """Greedy low-confidence remasking, semi-autoregressive: at each step the masked positions of
    the current block with the highest top-1 probability are committed to their argmax."""
    if gen % block or steps % (gen // block) or len({len(p) for p in prompts}) != 1:
        raise ValueError(f"gen={gen} must be a multiple of block={block}, steps={steps} of the block "
                         "count, and the prompts of one length")
    engine = llm.llm_engine
    mask_id = engine.info.mask_token_id
    plen, length = len(prompts[0]), len(prompts[0]) + gen
    canv = [torch.tensor(p + [mask_id] * gen) for p in prompts]
    traj = Trajectory(plen, length, [], [], [])
    for b in range(gen // block):
        lo = plen + b * block
        for n in transfer_counts(block, steps // (gen // block)):
            pos = [(c[lo:lo + block] == mask_id).nonzero().squeeze(-1) + lo for c in canv]
            rows = [RowInput(c.clone(), p, RowSpec(length, plen, DENSE)) for c, p in zip(canv, pos)]
            logits = engine.executor.execute(StepInput(rows))
            traj.canvases.append([r.token_ids for r in rows])
            chosen, lps = [], []
            for c, p, lg in zip(canv, pos, logits):
                lp = F.log_softmax(lg.float().cpu(), -1)
                conf, tok = lp.max(-1)
                top = conf.topk(min(n, len(p))).indices
                c[p[top]] = tok[top]
                chosen.append(p[top])
                lps.append(lp[top])
            traj.committed.append(chosen)
            traj.logprobs.append(lps)
    return traj


def teacher_forced_agreement(llm: LLM, setting: Setting, traj: Trajectory) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense || setting) in nats) over every committed position."""
    engine = llm.llm_engine
    steps, n_rows = len(traj.canvases), len(traj.canvases[0])
    same = total = 0
    kl = 0.0
    with _Patterns(llm, setting, [traj.length] * n_rows, steps, "tf") as pat:
        for s in range(steps):
            phase = pat.phase(s)
            rows = [RowInput(c, p, pat.spec(i, traj.length, traj.prompt_len, phase))
                    for i, (c, p) in enumerate(zip(traj.canvases[s], traj.committed[s]))]
            logits = engine.executor.execute(StepInput(rows))
            for lg, ref in zip(logits, traj.logprobs[s]):
                lp = F.log_softmax(lg.float().cpu(), -1)
                same += int((lp.argmax(-1) == ref.argmax(-1)).sum())
                kl += float((ref.exp() * (ref - lp)).sum())
                total += len(ref)
    return same / max(total, 1), kl / max(total, 1)
