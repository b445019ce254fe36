"""Model registry: config.json -> model class, by `architectures` first, then `model_type`."""
from __future__ import annotations

from model_executor.models.dream import DreamModel
from model_executor.models.llada import LLaDAModelLM

_BY_ARCHITECTURE = {"LLaDAModelLM": LLaDAModelLM, "DreamModel": DreamModel}
_BY_MODEL_TYPE = {"llada": LLaDAModelLM, "dream": DreamModel}   # matched case-insensitively


def resolve_model_class(config: dict) -> type:
    for arch in config.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = str(config.get("model_type", "")).lower()
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"unsupported architecture: architectures={config.get('architectures')!r}, "
        f"model_type={config.get('model_type')!r}; supported: architectures {sorted(_BY_ARCHITECTURE)}, "
        f"model_type {sorted(_BY_MODEL_TYPE)}")


__all__ = ["DreamModel", "LLaDAModelLM", "resolve_model_class"]
