"""Strict, streaming copy of checkpoint tensors into a module's parameters."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def load_named_tensors(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       ignore_suffixes: tuple[str, ...] = ()) -> None:
    """Copy each (name, tensor) into the parameter of that name (cast to its dtype/device).

    Every parameter must be provided exactly by name and shape; anything missing, unexpected
    or misshaped is collected and reported together in one ValueError. Names ending in
    `ignore_suffixes` are non-weights some checkpoints carry (e.g. rotary inv_freq buffers).
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    for name, tensor in weights:
        if name.endswith(ignore_suffixes) and name not in params:
            continue
        param = params.get(name)
        if param is None:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(param.shape):
            misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
        else:
            param.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    problems = [f"{label} ({len(items)}): {', '.join(items)}"
                for label, items in (("missing tensors", missing), ("unexpected tensors", sorted(unexpected)),
                                     ("wrong shapes", misshaped)) if items]
    if problems:
        raise ValueError(f"checkpoint does not match {type(module).__name__}: " + "; ".join(problems))
