"""Every environment variable the engine reads, parsed and validated by name in one place when an
engine starts (`read()`), so a bad value fails before any model or worker is loaded.

The low-level packages (attention_backends, model_executor) may not import the engine; they read
their own variable where it is used, and these are the same names and rules, checked first here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from attention_backends.registry import ENV_VAR as ATTENTION_BACKEND_ENV, installed_backends
from attention_backends.sdpa import SDPA_BACKENDS, SDPA_ENV
from sparsed_engine.executor.base import WORKER_TIMEOUT_ENV

FUSED_ELEMENTWISE_ENV = "SPARSED_FUSED_ELEMENTWISE"
API_KEY_ENV = "SPARSED_API_KEY"


def _backend(raw: str) -> str | None:
    if raw == "":
        return None  # set but empty: as if unset
    if raw not in installed_backends():
        raise ValueError(f"unknown attention backend {raw!r}; installed backends: {', '.join(installed_backends())}")
    return raw


def _sdpa(raw: str) -> str | None:
    if raw == "":
        return None
    if raw not in SDPA_BACKENDS:
        raise ValueError(f"choose from {', '.join(SDPA_BACKENDS)} (or leave it unset: fastest available)")
    return raw


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return raw == "1"


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a number of seconds > 0 and finite")
    return value


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    parse: Callable[[str], object]
    doc: str


ENV_VARS = {v.name: v for v in (
    EnvVar(ATTENTION_BACKEND_ENV, "", _backend,
           "attention backend when LLM(attention_backend=...) is not given (default: dense)"),
    EnvVar(SDPA_ENV, "", _sdpa, "pin one torch SDPA kernel for dense attention on CUDA"),
    EnvVar(FUSED_ELEMENTWISE_ENV, "1", _flag, "0: run the elementwise layers' torch references on CUDA"),
    EnvVar(WORKER_TIMEOUT_ENV, "600", _seconds, "seconds a call on the worker ranks may take before they count as hung"),
    EnvVar(API_KEY_ENV, "", lambda raw: raw or None,
           "`sparsed-engine serve`: the key every /v1 request must bear when --api-key is not given"),
)}


@dataclass(frozen=True)
class Envs:
    attention_backend: str | None
    sdpa_backend: str | None
    fused_elementwise: bool
    worker_timeout_s: float
    api_key: str | None


def read(environ: Mapping[str, str] | None = None) -> Envs:
    """The validated values; ValueError `NAME='value': why` for the first bad one."""
    environ = os.environ if environ is None else environ
    values = {}
    for var in ENV_VARS.values():
        raw = environ.get(var.name, var.default)
        try:
            values[var.name] = var.parse(raw)
        except ValueError as e:
            raise ValueError(f"environment variable {var.name}={raw!r}: {e}") from None
    return Envs(values[ATTENTION_BACKEND_ENV], values[SDPA_ENV], values[FUSED_ELEMENTWISE_ENV],
                values[WORKER_TIMEOUT_ENV], values[API_KEY_ENV])
