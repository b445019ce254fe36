"""A model family: the contract of its architecture (DiffusionLM) and the pair registered for it
(ModelFamily: architecture + denoiser, whose contract is model_executor.denoisers.base.Denoiser)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from attention_backends.base import AttentionLayout
from model_executor.denoisers.base import Denoiser


class DiffusionLM(nn.Module, ABC):
    """Token ids -> hidden states -> logits, with official parameter names.

    Built as `cls(config, backend)` from config.json's dict and an AttentionBackend (on the meta
    device, then filled by `load_weights`); every attention layer calls `backend.forward(q, k, v, metadata, layer)`.
    """
    default_mask_token_id: ClassVar[int | None] = None  # when config.json and generation_config name none
    logits_shift: ClassVar[int] = 0   # set from the family's denoiser, which owns it

    @staticmethod
    @abstractmethod
    def parse_config(config: dict) -> Any:
        """The checked architecture settings; must have `vocab_size`, `logits_size` and `max_len`.
        ValueError naming the bad key."""

    @staticmethod
    @abstractmethod
    def attention_layout(config: dict) -> AttentionLayout: ...

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        """Packed tokens [T] at their canvas positions [T] -> final hidden states [T, d]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor, token_indices: torch.Tensor) -> torch.Tensor:
        """float32 logits [len(token_indices), vocab] of the given tokens (read from hidden row
        i - logits_shift)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


@dataclass(frozen=True)
class ModelFamily:
    """What an entry point of the group `sparsed_engine.models` names (model_executor.families)."""
    name: str                          # the entry point's name
    model_class: type[DiffusionLM]
    denoiser: Denoiser
    architectures: tuple[str, ...]     # config.json `architectures` entries it loads
    model_types: tuple[str, ...] = ()  # config.json `model_type`, matched case-insensitively
