"""Backends are found through the entry-point group `sparsed_engine.attention_backends`.

The project's own `dense` and `sparsed` are registered in pyproject.toml through that same group,
so a third-party package adds a backend just by being installed.
"""
from __future__ import annotations

import os
from importlib.metadata import entry_points

from attention_backends.base import AttentionBackend

GROUP = "sparsed_engine.attention_backends"
ENV_VAR = "SPARSED_ATTENTION_BACKEND"
DEFAULT = "dense"


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed_backends() -> list[str]:
    return sorted(_entry_points())


def selected_backend_name(requested: str | None) -> str:
    """An explicit choice wins, then the environment variable, then dense."""
    return requested or os.environ.get(ENV_VAR) or DEFAULT


def get_backend_class(name: str):
    eps = _entry_points()
    if name not in eps:
        raise ValueError(f"unknown attention backend {name!r}; installed backends: "
                         f"{', '.join(sorted(eps)) or '(none)'}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
        raise TypeError(f"entry point {name!r} ({eps[name].value}) is not an AttentionBackend subclass")
    return cls
