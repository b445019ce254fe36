"""Packs a step's rows into one token batch, runs the model, and returns logits where asked.

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
        lengths = [r.token_ids.numel() for r in rows]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        ids = torch.cat([r.token_ids for r in rows])
        positions = torch.cat([torch.arange(n) for n in lengths])
        wanted = torch.cat([r.logits_positions + s for r, s in zip(rows, starts)])
        metadata = self.backend.build_metadata([r.spec for r in rows])  # once per step
        if self.group is None:
            hidden = self.model(ids.to(self.device, non_blocking=True), positions.to(self.device, non_blocking=True),
                                metadata)
            logits = self.model.compute_logits(hidden, wanted.to(self.device, non_blocking=True))
        else:
            shift = self.model.logits_shift   # logits of position i come from hidden row i - shift
            shard = self.group.shard(ids.numel())
            hidden = self.model(shard.take(ids).to(self.device, non_blocking=True),
                                shard.take(positions).to(self.device, non_blocking=True), metadata)
            hidden = self.group.gather_rows(hidden, wanted - shift, shard)
            if hidden is None:
                return None
            # compute_logits reads hidden[i - shift]; `hidden` now holds just those rows, in order
            logits = self.model.compute_logits(hidden, torch.arange(wanted.numel(), device=self.device) + shift)
        return list(logits.split([r.logits_positions.numel() for r in rows]))
