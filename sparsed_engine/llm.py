"""The user-facing entry point: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import threading
import weakref
from typing import Sequence as Seq

from tqdm.auto import tqdm

from sparsed_engine.config import DEFAULT_MODEL, EngineConfig
from sparsed_engine.engine.llm_engine import LLMEngine, Prompt
from sparsed_engine.inputs import as_prompt_list
from sparsed_engine.outputs import RequestOutput
from sparsed_engine.sampling_params import SamplingParams


class LLM:
    """A diffusion LM (LLaDA or Dream) loaded from a local Hugging Face folder (default: the
    bundled tiny LLaDA, DEFAULT_MODEL).

    Keyword arguments are those of EngineConfig: dtype, device, max_model_len, attention_backend,
    attention_config, mask_pool_bytes, load_format, trust_remote_code, sequence_parallel_size,
    distributed_executor_backend, kv_cache (throughput mode: "none", "prefix" or "dual"), kv_cache_bytes,
    kv_cache_memory_fraction, kv_cache_page_size, ... Workers and devices are released by `shutdown()`, at the end
    of a `with LLM(...) as llm:` block, when the object is collected, or at interpreter exit.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig(model=str(DEFAULT_MODEL) if model is None else model, **kwargs))
        # holds the engine, not self, so an unused LLM can still be collected (and shut down then)
        self._finalizer = weakref.finalize(self, self.llm_engine.shutdown)
        self._lock = threading.Lock()   # one generate at a time: each steps every request in the engine

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        Every request is checked before any is queued, so a bad one loses nothing. A request that
        fails while it runs comes back with finish_reason "error" and its `error`; the others
        complete. Calls from several threads run one after another, each getting its own outputs.
        """
        with self._lock:
            return self._generate(prompts, sampling_params, use_tqdm)

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if not self._finalizer.alive:
            raise RuntimeError("this LLM was shut down; create a new one")
        prompts = as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, (list, tuple)):  # one for all (make_sequence checks its type)
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.llm_engine
        seqs = [engine.make_sequence(p, sp) for p, sp in zip(prompts, params)]
        for seq in seqs:
            engine.add_sequence(seq)
        return self._run(seqs, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the generation prompt), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, seqs, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = {s.request_id for s in seqs}
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(seqs), desc="Denoising", unit="req", disable=not use_tqdm)
        steps = 0
        try:
            while len(done) < len(wanted) and engine.has_unfinished_requests():
                finished = engine.step()
                steps += 1
                for out in finished:
                    if out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
                bar.set_postfix(steps=steps, refresh=False)
        except BaseException:
            for rid in wanted - done.keys():  # leave nothing half-run in the engine
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[s.request_id] for s in seqs]

    def get_stats(self) -> dict:
        return self.llm_engine.get_stats()

    def shutdown(self) -> None:
        """Release the workers and their devices (and a Ray instance the engine started); idempotent."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
