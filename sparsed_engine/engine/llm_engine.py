"""The engine: requests in, one denoising step at a time, finished outputs out."""
from __future__ import annotations

import itertools
import time

from attention_backends.base import SELECT, KVPoolSpec, PoolSpec, RowSpec, kv_page_bytes
from attention_backends.registry import get_backend_class, selected_backend_name
from model_executor.families import get_family
from model_executor.model_loader import load_tokenizer, read_model_info
from model_executor.parallel import rank_layout
from model_executor.step_input import RowInput, StepInput
from model_executor.worker import WorkerConfig
from sparsed_engine.config import EngineConfig
from sparsed_engine.engine.block_manager import BlockManager
from sparsed_engine.engine.scheduler import Scheduler
from sparsed_engine.engine.sequence import Sequence
from sparsed_engine.engine.stop import stop_string_cut
from sparsed_engine.executor import make_executor
from sparsed_engine.outputs import CompletionOutput, RequestOutput
from sparsed_engine import envs
from sparsed_engine.inputs import parse_prompt
from sparsed_engine.request_memory import check_request_fits
from sparsed_engine.sampling_params import SamplingParams, validated

Prompt = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.envs = envs.read()  # every environment variable, validated before anything loads
        self.info = read_model_info(config.model)
        self.denoiser = get_family(self.info.family).denoiser   # the engine never names a family
        self.tokenizer = (None if config.skip_tokenizer_init
                          else load_tokenizer(config.tokenizer or config.model, config.trust_remote_code))
        self.backend_name = selected_backend_name(config.attention_backend)
        self.backend_cls = get_backend_class(self.backend_name)
        self.backend_cls.check_device(self.backend_cls.resolve_config(config.attention_config),  # engine-wide
                                      config.resolved_device())                                 # settings fail here
        if config.kv_cache != "none" and not self.backend_cls.supports_kv_cache:
            raise ValueError(f"EngineConfig.kv_cache={config.kv_cache!r}: attention backend "
                             f"{self.backend_name!r} has no KV-cache path; use kv_cache='none' or another backend")
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
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(16384, self.max_model_len)
        self.scheduler = Scheduler(
            self._block_manager(num_blocks, block_bytes), self.backend_cls, config.max_num_seqs,
            self.max_num_batched_tokens)
        eos = set(self.info.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()
        self._finished_seq_ids: list[int] = []   # told to the workers with the next step

    def _block_manager(self, num_blocks: int, block_bytes: int) -> BlockManager:
        """Sizes and allocates the KV pool (after the pattern pool, from the memory left) when the
        engine's default mode caches or kv_cache_bytes is given."""
        cfg = self.config
        page_size = cfg.kv_cache_page_size
        page_bytes = kv_page_bytes(self.layout, page_size, self.dtype)   # one rank's heads
        enabled = cfg.wants_kv_pool and self.backend_cls.supports_kv_cache
        num_pages = 0
        if enabled:
            if cfg.kv_cache_bytes is not None:
                num_pages = cfg.kv_cache_bytes // page_bytes
            else:   # a fraction of free memory, but never more than the scheduler could fill
                num_pages = min(self.executor.available_pool_bytes(cfg.kv_cache_memory_fraction) // page_bytes,
                                self._max_useful_kv_pages(page_size))
            self.executor.init_kv_pool(KVPoolSpec(num_pages, page_size))
        return BlockManager(num_blocks, block_bytes, num_pages, page_bytes, page_size, enabled)

    def _max_useful_kv_pages(self, page_size: int) -> int:
        """Pages the running batch can hold at most: admission keeps its canvas tokens within the
        token budget (a lone request may exceed it, up to two rows of max_model_len), and each
        canvas row rounds up to whole pages (at most one partial page per row, two rows a request)."""
        tokens = max(self.max_num_batched_tokens, 2 * self.max_model_len)
        return -(-tokens // page_size) + 2 * self.config.max_num_seqs

    # ---------------------------------------------------------------- requests
    def make_sequence(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Check one request completely (raising ValueError naming the bad value) without queuing it."""
        params = validated(params)
        if request_id is not None:
            self._check_unique(request_id)
        text, ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={params.stop!r} needs the tokenizer, "
                             f"which skip_tokenizer_init=True left out")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the model's limit of {self.max_model_len} tokens; "
                f"raise it with LLM(max_model_len=...) (SparseD targets contexts far beyond training length)")
        policy = self.denoiser.resolve_policy(params, self.info.generation_config)
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
        mode = params.kv_cache if params.kv_cache is not None else self.config.kv_cache
        kv_pages = self._kv_pages_needed(mode, params, len(ids) + params.max_tokens, rows)
        rid = request_id if request_id is not None else self._new_id()
        return Sequence(rid, text, ids, params, self.denoiser, policy, self.info.mask_token_id, attn_cfg, blocks,
                        mode, kv_pages)

    def _kv_pages_needed(self, mode: str, params: SamplingParams, canvas_len: int, rows: int) -> int:
        """KV pages of a request in `mode` (0 in exact mode); ValueError when it can never run."""
        if mode == "none":
            return 0
        source = (f"SamplingParams.kv_cache={mode!r}" if params.kv_cache is not None
                  else f"EngineConfig.kv_cache={mode!r}")
        if not self.backend_cls.supports_kv_cache:
            raise ValueError(f"{source}: attention backend {self.backend_name!r} has no KV-cache path; "
                             f"use kv_cache='none' or another backend")
        bm = self.scheduler.block_manager
        if not bm.kv_enabled:
            raise ValueError(f"{source} needs the KV pool, which this engine did not allocate: start it with "
                             f"LLM(kv_cache='prefix' or 'dual') or LLM(kv_cache_bytes=...)")
        pages = rows * bm.kv_pages_per_row(canvas_len)
        if not bm.kv.can_ever_fit(pages):
            cfg = self.config
            option = (f"kv_cache_bytes={cfg.kv_cache_bytes}" if cfg.kv_cache_bytes is not None
                      else f"kv_cache_memory_fraction={cfg.kv_cache_memory_fraction}")
            raise ValueError(
                f"{source}: the request's canvas ({canvas_len} tokens, {rows} row(s)) needs {pages} KV pages "
                f"({pages * bm.kv.block_bytes} bytes) but the KV pool holds {bm.kv.num_blocks} "
                f"({bm.kv.num_blocks * bm.kv.block_bytes} bytes); raise LLM({option})")
        return pages

    def _new_id(self) -> str:
        live = self.scheduler.request_ids()
        return next(rid for rid in map(str, self._ids) if rid not in live)

    def _check_unique(self, request_id: str) -> None:
        if request_id in self.scheduler.request_ids():
            raise ValueError(f"request_id={request_id!r} is already running or waiting; "
                             f"request ids must be unique among unfinished requests")

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
        self._check_unique(seq.request_id)   # again: another may have been added since make_sequence
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self._finished_seq_ids.append(seq.seq_id)
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """One denoising step of every running request; returns the requests that finished.

        Rank 0's worker samples (the logits never leave it) and returns, per request, the
        positions it committed and their token ids. A request whose sampling raised finishes
        with finish_reason "error" and its error; the others go on.
        """
        batch = self.scheduler.schedule()
        rows, sampling, owners = [], [], []
        for seq, phase in batch:
            positions = seq.masked_positions()
            n, p = seq.transfer_plan(positions.numel())
            if phase != SELECT and n == 0 and p == 0:
                continue  # commits nothing and selects no pattern: nothing would change
            per_row = len(seq.pattern_blocks) // seq.num_rows
            computed = seq.computed_span()
            for r, canvas in enumerate(seq.rows()):
                spec = RowSpec(canvas.numel(), seq.prompt_len, phase,
                               seq.pattern_blocks[r * per_row:(r + 1) * per_row], seq.attention_config,
                               seq.kv_pages[r], computed)
                rows.append(RowInput(canvas, positions, spec))
            if seq.needs_refresh:
                seq.kv_block = seq.block   # this step stores the block's refresh
            sampling.append(seq.sampling(n, p))
            owners.append(seq)
        if rows:
            results = self._execute(StepInput(rows, sampling, list(self._finished_seq_ids)))
            for seq, res in zip(owners, results):
                if res.error is not None:
                    seq.fail(res.error)
                else:
                    seq.commit(res.positions, res.token_ids)
        for seq, _ in batch:
            if not seq.is_finished:
                seq.advance()
                seq.metrics.steps += 1
        finished = self.scheduler.update()
        self._finished_seq_ids += [seq.seq_id for seq in finished]
        if self._finished_seq_ids and not self.scheduler.has_unfinished():
            self._execute(StepInput([], [], list(self._finished_seq_ids)))  # free their generators now
        return [self._output(seq) for seq in finished]

    def _execute(self, step: StepInput) -> list:
        results = self.executor.execute(step)
        # only once a worker got them: ids are never reused, so sending them twice is harmless
        del self._finished_seq_ids[:len(step.finished_seq_ids)]
        return results

    # ---------------------------------------------------------------- outputs
    def _output(self, seq: Sequence) -> RequestOutput:
        """The first EOS or stop token ends the output (it is dropped); a stop string ends the text
        where it begins and the token ids before the token it begins in. A failed request
        ("error") keeps no tokens."""
        ids = seq.generated_token_ids() if seq.finish_reason != "error" else []
        finish, stop_reason = seq.finish_reason, None
        final = finish not in ("abort", "error")
        stops = self.eos_token_ids | set(seq.params.stop_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), None)
        if cut is not None and final:
            finish = "stop"
            stop_reason = ids[cut] if ids[cut] in seq.params.stop_token_ids else None
            ids = ids[:cut]
        text = self._decode(ids)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if hits and final:
            pos, s = min(hits)
            ids = ids[:stop_string_cut(self._decode, ids, pos)]
            text, finish, stop_reason = text[:pos], "stop", s
        seq.metrics.finished_time = time.time()
        seq.metrics.num_generated_tokens = len(ids)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(0, text, ids, finish, stop_reason)], finished=True,
            metrics=seq.metrics, error=seq.error)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def get_stats(self, workers: bool = True) -> dict:
        """Scheduler-side counts and pool blocks; with `workers`, also what the workers allocated
        (a call to every rank: not for every step)."""
        bm = self.scheduler.block_manager
        pool, kv = bm.stats(), bm.kv_stats()
        if workers:
            pool.update(self.executor.pool_usage())
            if bm.kv_enabled:
                kv.update(self.executor.kv_pool_usage())
        return {"backend": self.backend_name,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "mask_pool": pool,
                "kv_pool": kv}

    def shutdown(self) -> None:
        self.executor.shutdown()
