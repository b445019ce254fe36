"""Packs a step's rows into one token batch, runs the model, and returns logits where asked."""
from __future__ import annotations

import torch

from model_executor.step_input import StepInput


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, device: torch.device):
        self.model = model
        self.backend = backend
        self.device = device

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[torch.Tensor]:
        rows = step.rows
        lengths = [r.token_ids.numel() for r in rows]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        ids = torch.cat([r.token_ids for r in rows]).to(self.device, non_blocking=True)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device, non_blocking=True)
        wanted = torch.cat([r.logits_positions + s for r, s in zip(rows, starts)])
        metadata = self.backend.build_metadata([r.spec for r in rows])  # once per step
        hidden = self.model(ids, positions, metadata)
        logits = self.model.compute_logits(hidden, wanted.to(self.device, non_blocking=True))
        return list(logits.split([r.logits_positions.numel() for r in rows]))
