"""The plain data a worker receives for one denoising step (no requests, no scheduler objects)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.base import RowSpec


@dataclass
class RowInput:
    token_ids: torch.Tensor        # [L] canvas of this row (CPU, long)
    logits_positions: torch.Tensor  # [M] canvas positions whose logits are wanted (CPU, long)
    spec: RowSpec                  # attention plan of this row at this step


@dataclass
class StepInput:
    rows: list[RowInput]
