"""The engine: requests in, one denoising step at a time, finished outputs out."""
from __future__ import annotations

import itertools
import time

import torch

from attention_backends.base import PoolSpec, RowSpec
from attention_backends.registry import get_backend_class, selected_backend_name
from model_executor.model_loader import load_tokenizer, read_model_info
from model_executor.parallel import rank_layout
from model_executor.step_input import RowInput, StepInput
from model_executor.worker import WorkerConfig
from sparsed_engine.config import EngineConfig
from sparsed_engine.engine import unmasking
from sparsed_engine.engine.block_manager import BlockManager
from sparsed_engine.engine.scheduler import Scheduler
from sparsed_engine.engine.sequence import Sequence
from sparsed_engine.executor import make_executor
from sparsed_engine.outputs import CompletionOutput, RequestOutput
from sparsed_engine import envs
from sparsed_engine.inputs import parse_prompt
from sparsed_engine.request_memory import check_request_fits
from sparsed_engine.sampling_params import SamplingParams, validated

_POLICIES = {"llada": ("low_confidence", "random"), "dream": ("origin", "maskgit_plus", "topk_margin", "entropy")}
# generation_config key of each family's default policy, and the reference code's default
_DEFAULT_POLICY = {"llada": ("remasking", "low_confidence"), "dream": ("alg", "origin")}

Prompt = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.envs = envs.read()  # every environment variable, validated before anything loads
        self.info = read_model_info(config.model)
        self.tokenizer = (None if config.skip_tokenizer_init
                          else load_tokenizer(config.tokenizer or config.model, config.trust_remote_code))
        self.backend_name = selected_backend_name(config.attention_backend)
        self.backend_cls = get_backend_class(self.backend_name)
        self.backend_cls.check_device(self.backend_cls.resolve_config(config.attention_config),  # engine-wide
                                      config.resolved_device())                                 # settings fail here
        # one rank's heads: each rank stores the patterns of its own heads under the same block ids
        self.layout = rank_layout(self.info.attention_layout, config.sequence_parallel_size)
        self.max_model_len = config.max_model_len or self.info.max_model_len
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.info.torch_dtype)
        self.executor = make_executor(config.distributed_executor_backend, WorkerConfig(
            model=config.model, dtype=self.dtype, device=self.device, attention_backend=self.backend_name,
            load_format=config.load_format, sequence_parallel_size=config.sequence_parallel_size))
        block_bytes = config.mask_pool_block_bytes
        num_blocks = 0
        if self.backend_cls.keeps_patterns:
            pool_bytes = (config.mask_pool_bytes if config.mask_pool_bytes is not None
                          else self.executor.available_pool_bytes(config.mask_pool_fraction))
            num_blocks = pool_bytes // block_bytes
        self.executor.init_pool(PoolSpec(num_blocks, block_bytes))
        self.scheduler = Scheduler(
            BlockManager(num_blocks, block_bytes), self.backend_cls, config.max_num_seqs,
            config.max_num_batched_tokens or max(16384, self.max_model_len))
        eos = set(self.info.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()

    # ---------------------------------------------------------------- requests
    def make_sequence(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Check one request completely (raising ValueError naming the bad value) without queuing it."""
        params = validated(params)
        text, ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={params.stop!r} needs the tokenizer, "
                             f"which skip_tokenizer_init=True left out")
        family = self.info.family
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the model's limit of {self.max_model_len} tokens; "
                f"raise it with LLM(max_model_len=...) (SparseD targets contexts far beyond training length)")
        policy = params.unmasking
        if policy is None:
            key, fallback = _DEFAULT_POLICY[family]
            policy = self.info.generation_config.get(key, fallback)
        if policy not in _POLICIES[family]:
            raise ValueError(f"SamplingParams.unmasking={policy!r} is not a {family} policy; "
                             f"choose from {_POLICIES[family]}")
        if params.alg_temp and family != "dream":
            raise ValueError(f"SamplingParams.alg_temp={params.alg_temp!r} applies to Dream models only")
        check_request_fits(len(ids), params, self.layout, self.info.vocab_size, self.dtype, self.device)
        attn_cfg = self.backend_cls.resolve_config(self.config.attention_config, params.attention_config)
        self.backend_cls.check_device(attn_cfg, self.device)
        rows = 2 if params.cfg_scale > 0 else 1
        blocks = rows * self.backend_cls.pattern_blocks_needed(
            self.layout, len(ids) + params.max_tokens, attn_cfg, self.scheduler.block_manager.block_bytes,
            params.steps)
        bm = self.scheduler.block_manager
        if not bm.can_ever_fit(blocks):
            raise ValueError(
                f"the request's sparse pattern needs {blocks} pool blocks ({blocks * bm.block_bytes} bytes) "
                f"but the pattern pool holds {bm.num_blocks}; raise LLM(mask_pool_bytes=...)")
        rid = request_id if request_id is not None else str(next(self._ids))
        return Sequence(rid, text, ids, params, family, policy, self.info.mask_token_id, attn_cfg, blocks)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        text, ids = parse_prompt(prompt)
        if ids is None:
            if self.tokenizer is None:
                raise ValueError(f"prompt {text!r:.80} is text but skip_tokenizer_init=True: "
                                 f"pass token ids")
            ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("prompt is empty: a diffusion LM needs at least one prompt token")
        vocab = self.info.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token id {next(t for t in ids if t < 0 or t >= vocab)} "
                             f"is outside the vocabulary [0, {vocab})")
        if self.info.mask_token_id in ids:
            raise ValueError(f"prompt contains the mask token id {self.info.mask_token_id}")
        return text, ids

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        seq = self.make_sequence(prompt, params, request_id)
        self.add_sequence(seq)
        return seq.request_id

    def add_sequence(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.abort(request_id)
        return self._output(seq) if seq is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """One denoising step of every running request; returns the requests that finished."""
        batch = self.scheduler.schedule()
        rows, owners = [], []
        for seq, phase in batch:
            positions = seq.masked_positions()
            if not seq.needs_forward(phase, positions.numel()):
                continue
            per_row = len(seq.pattern_blocks) // seq.num_rows
            for r, canvas in enumerate(seq.rows()):
                spec = RowSpec(canvas.numel(), seq.prompt_len, phase,
                               seq.pattern_blocks[r * per_row:(r + 1) * per_row], seq.attention_config)
                rows.append(RowInput(canvas, positions, spec))
            owners.append((seq, positions))
        logits = self.executor.execute(StepInput(rows)) if rows else []
        row = 0
        for seq, positions in owners:
            seq_logits = logits[row]
            if seq.num_rows == 2:  # classifier-free guidance
                uncond = logits[row + 1]
                seq_logits = uncond + (seq.params.cfg_scale + 1) * (seq_logits - uncond)
            row += seq.num_rows
            self._commit(seq, positions, seq_logits)
        for seq, _ in batch:
            seq.advance()
            seq.metrics.steps += 1
        return [self._output(seq) for seq in self.scheduler.update()]

    def _commit(self, seq: Sequence, positions: torch.Tensor, logits: torch.Tensor) -> None:
        n, p_transfer = seq.transfer_plan(positions.numel())
        gen = seq.generator(logits.device)
        # a committed mask id would leave its position masked for good (a mask id in the output)
        logits = logits.index_fill(-1, torch.tensor([seq.mask_token_id], device=logits.device), float("-inf"))
        if seq.family == "llada":
            idx, tokens = unmasking.llada_unmask(logits, n, seq.params, seq.policy, gen)
        else:
            idx, tokens = unmasking.dream_unmask(logits, n, p_transfer, seq.params, seq.policy, gen)
        seq.commit(positions[idx.cpu()], tokens)

    # ---------------------------------------------------------------- outputs
    def _output(self, seq: Sequence) -> RequestOutput:
        ids = seq.generated_token_ids()
        finish, stop_reason = seq.finish_reason, None
        stops = self.eos_token_ids | set(seq.params.stop_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), None)
        if cut is not None and finish != "abort":
            finish = "stop"
            stop_reason = ids[cut] if ids[cut] in seq.params.stop_token_ids else None
            ids = ids[:cut]
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if hits and finish != "abort":
            pos, s = min(hits)
            text, finish, stop_reason = text[:pos], "stop", s
        seq.metrics.finished_time = time.time()
        seq.metrics.num_generated_tokens = len(ids)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(0, text, ids, finish, stop_reason)], finished=True,
            metrics=seq.metrics)

    def get_stats(self) -> dict:
        return {"backend": self.backend_name,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "mask_pool": {**self.scheduler.block_manager.stats(), **self.executor.pool_usage()}}

    def shutdown(self) -> None:
        self.executor.shutdown()
