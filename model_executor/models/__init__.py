"""Model architectures; config.json -> model class through the installed families."""
from __future__ import annotations

from model_executor.models.base import DiffusionLM
from model_executor.models.dream import DreamModel
from model_executor.models.llada import LLaDAModelLM


def resolve_model_class(config: dict) -> type[DiffusionLM]:
    from model_executor.families import resolve_family   # families import the model modules

    return resolve_family(config).model_class


__all__ = ["DiffusionLM", "DreamModel", "LLaDAModelLM", "resolve_model_class"]
