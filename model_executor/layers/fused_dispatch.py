"""Whether the elementwise layers run their Triton kernels (fused_elementwise.py): on CUDA with
Triton installed, unless SPARSED_FUSED_ELEMENTWISE=0 asks for the torch references, and never
while autograd is recording (training)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def _enabled() -> bool:
    return os.environ.get("SPARSED_FUSED_ELEMENTWISE", "1") != "0" and importlib.util.find_spec("triton") is not None


def fused_kernels(x: torch.Tensor):
    """The fused_elementwise module when x should use it, else None (the import is lazy).

    The kernels have no backward: their outputs carry no autograd history, so a forward with
    grad enabled through them would leave every weight below the LM head without a gradient
    (a CUDA training run then only fits the head: unigram loss, uniform attention). With grad
    enabled the torch references run instead; the engine's forward runs in inference mode.
    """
    if torch.is_grad_enabled() or not (x.is_cuda and _enabled()):
        return None
    from model_executor.layers import fused_elementwise
    return fused_elementwise
