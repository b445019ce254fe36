"""Which sequences run in a denoising step, and what their attention does in it.

Every running sequence takes part in every step (a DLM step is a whole-canvas pass). Waiting
requests are admitted in arrival order while the token budget, the sequence cap, the pattern pool
and the KV pool allow (a request's KV pages are allocated as it is admitted).

SparseD in throughput mode: dense until the backend's selection step; the pattern is selected at
the first refresh step at or after it (a cached step never selects: it sees only part of the
canvas); after that every step, refresh or cached, is sparse.
"""
from __future__ import annotations

import time
from collections import deque

from attention_backends.base import DENSE, SELECT, SPARSE
from sparsed_engine.engine.block_manager import BlockManager
from sparsed_engine.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, backend_cls, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.backend_cls = backend_cls
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def request_ids(self) -> set[str]:
        # one C-level copy first: AsyncLLM validates requests in another thread while the engine
        # loop moves sequences between these queues, and iterating a deque that changes raises
        return {s.request_id for s in (*self.waiting, *self.running)}

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        tokens = sum(s.num_tokens for s in self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.running and tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_admit(seq.pattern_blocks_needed, seq.kv_pages_needed):
                break  # waits until a running request frees its pattern or its pages
            self.waiting.popleft()
            seq.kv_pages = self.block_manager.admit(seq.request_id, seq.pattern_blocks_needed,
                                                    seq.kv_pages_needed, seq.num_rows)
            seq.status = SequenceStatus.RUNNING
            seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            tokens += seq.num_tokens

    def phase_of(self, seq: Sequence) -> str:
        if not seq.pattern_blocks_needed:
            return DENSE
        phase = self.backend_cls.phase(seq.step, seq.total_steps, seq.attention_config)
        if seq.kv_cache == "none":
            return phase
        if seq.pattern_blocks:   # selected at an earlier refresh
            return SPARSE
        return SELECT if phase != DENSE and seq.needs_refresh else DENSE

    def schedule(self) -> list[tuple[Sequence, str]]:
        """The sequences of this step with their attention phase; patterns get their ids here."""
        self._admit()
        batch = []
        for seq in self.running:
            phase = self.phase_of(seq)
            if phase == SELECT:
                seq.pattern_blocks = self.block_manager.allocate(seq.request_id)
            batch.append((seq, phase))
        return batch

    def update(self) -> list[Sequence]:
        """Retire finished sequences and free their patterns."""
        finished = [s for s in self.running if s.is_finished]
        for seq in finished:
            self.block_manager.free(seq.request_id)
        self.running = [s for s in self.running if not s.is_finished]
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.block_manager.free(request_id)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        self.block_manager.free(request_id)  # blocks of a request lost mid-admission (an interrupt)
        return None
