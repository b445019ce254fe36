"""What a rank does with a call, the same in every executor: run a Worker method (by name) or
fn(worker, *args), and answer plain CPU data, or the description of what it raised."""
from __future__ import annotations

import dataclasses
import traceback

import torch

from model_executor.worker import Worker


def run_method(worker: Worker, method, args: tuple):
    fn = method if callable(method) else getattr(Worker, method)
    return fn(worker, *args)


def call_worker(worker: Worker, method, args: tuple) -> tuple[str, object]:
    """("ok", result on the CPU) or ("error", what was raised): the answer that crosses to the driver."""
    try:
        return "ok", to_cpu(run_method(worker, method, args))
    except Exception as e:  # noqa: BLE001 - reported to the driver, which fails the group
        return "error", describe(e)


def to_cpu(value):
    """`value` with every tensor in it (in lists, tuples, dicts, dataclasses) moved to the CPU, so
    that an answer crossing a process boundary holds no device memory handle."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, tuple):  # a namedtuple
        return type(value)(*(to_cpu(v) for v in value))
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_cpu(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def describe(e: BaseException) -> str:
    """The exception's type and text, and the line that raised it."""
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"
