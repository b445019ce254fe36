"""Packs a step's rows into one token batch, runs the model, and returns logits where asked.

A cached step of throughput mode (RowSpec.computed=(s, e)) packs only canvas positions s..e-1 of
its row, at their canvas positions (RoPE), and its wanted logits are mapped into that span.

Under sequence parallelism each rank runs the model on its contiguous shard of the packed
tokens; only the hidden rows that hold wanted logits travel to rank 0, which alone computes logits.
"""
from __future__ import annotations

import torch

from model_executor.parallel import SequenceParallelGroup
from model_executor.step_input import StepInput


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, device: torch.device,
                 group: SequenceParallelGroup | None = None):
        self.model = model
        self.backend = backend
        self.device = device
        self.group = group

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[torch.Tensor] | None:
        """Logits per row on rank 0 (and without sequence parallelism); None on other ranks."""
        rows = step.rows
        shift = self.model.logits_shift   # logits of position i come from hidden row i - shift
        spans = [self._span(i, r, shift) for i, r in enumerate(rows)]
        lengths = [e - s for s, e in spans]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        ids = torch.cat([r.token_ids[s:e] for r, (s, e) in zip(rows, spans)])
        positions = torch.cat([torch.arange(s, e) for s, e in spans])
        wanted = torch.cat([r.logits_positions + (p - s) for r, (s, _), p in zip(rows, spans, starts)])
        metadata = self.backend.build_metadata([r.spec for r in rows])  # once per step
        if self.group is None:
            hidden = self.model(ids.to(self.device, non_blocking=True), positions.to(self.device, non_blocking=True),
                                metadata)
            logits = self.model.compute_logits(hidden, wanted.to(self.device, non_blocking=True))
        else:
            shard = self.group.shard(ids.numel())
            hidden = self.model(shard.take(ids).to(self.device, non_blocking=True),
                                shard.take(positions).to(self.device, non_blocking=True), metadata)
            hidden = self.group.gather_rows(hidden, wanted - shift, shard)
            if hidden is None:
                return None
            # compute_logits reads hidden[i - shift]; `hidden` now holds just those rows, in order
            logits = self.model.compute_logits(hidden, torch.arange(wanted.numel(), device=self.device) + shift)
        return list(logits.split([r.logits_positions.numel() for r in rows]))

    @staticmethod
    def _span(i: int, row, shift: int) -> tuple[int, int]:
        """The canvas positions of a row that run this step; ValueError when a wanted logit would
        read a hidden row outside them (a cached step's logits must lie in [s + shift, e))."""
        if row.spec.computed is None:
            return 0, row.token_ids.numel()
        s, e = row.spec.computed
        if row.spec.length != row.token_ids.numel():
            raise ValueError(f"row {i}: RowSpec.length={row.spec.length} but the canvas has "
                             f"{row.token_ids.numel()} tokens")
        pos = row.logits_positions
        if pos.numel() and (int(pos.min()) - shift < s or int(pos.max()) >= e):
            raise ValueError(f"row {i}: logits positions {int(pos.min())}..{int(pos.max())} need hidden rows "
                             f"{int(pos.min()) - shift}..{int(pos.max()) - shift}, outside the computed span "
                             f"{row.spec.computed} (logits_shift={shift}: start the span {shift} earlier)")
        return s, e
