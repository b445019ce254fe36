"""Refuse, before any work, a request whose canvas cannot fit on the device at all.

A lower bound of one step's memory (the canvas ids, the hidden states of every canvas row, the
float32 logits of one block's positions) against the device's *total* memory: a request refused
here could never run, so the check never refuses one that could.
"""
from __future__ import annotations

import functools
import os

import torch

from sparsed_engine.validation import InvalidValueError

_ACTIVATIONS_PER_HIDDEN = 4  # residual, normed input, attention output, one projection: the least live at once
_GiB = 1 << 30


@functools.cache
def device_total_bytes(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def step_bytes_lower_bound(canvas_len: int, rows: int, block_length: int, hidden_size: int,
                           vocab_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    ids = rows * canvas_len * 8
    hidden = rows * canvas_len * hidden_size * itemsize * _ACTIVATIONS_PER_HIDDEN
    logits = rows * block_length * vocab_size * 4
    return ids + hidden + logits


def check_request_fits(prompt_len: int, params, layout, vocab_size: int, dtype: torch.dtype,
                       device: str) -> None:
    """InvalidValueError with the estimate when one step of this request exceeds the device's memory."""
    rows = 2 if params.cfg_scale > 0 else 1
    canvas = prompt_len + params.max_tokens
    need = step_bytes_lower_bound(canvas, rows, params.block_length, layout.total_heads * layout.head_dim,
                                  vocab_size, dtype)
    have = device_total_bytes(device)
    if need > have:
        raise InvalidValueError(
            f"SamplingParams.max_tokens={params.max_tokens}: a canvas of {canvas} tokens ({rows} row(s)) needs "
            f"at least {need / _GiB:.1f} GiB for one step on {device}, which has {have / _GiB:.1f} GiB in all; "
            f"lower max_tokens or the prompt length")
