"""Attention backends: tensors and per-step metadata in, attention out.

This package imports neither the engine (`sparsed_engine`) nor the models (`model_executor`).
"""
from attention_backends.base import AttentionBackend, AttentionLayout, RowSpec
from attention_backends.registry import get_backend_class, installed_backends

__all__ = ["AttentionBackend", "AttentionLayout", "RowSpec", "get_backend_class", "installed_backends"]
