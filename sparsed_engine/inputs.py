"""What a prompt may be, checked before any request is queued: a string, a sequence of token ids
(Python or numpy integers, never bools, floats, strings or bytes), or a dict with
`prompt_token_ids` (and optionally its `prompt` text) or with `prompt` alone."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from sparsed_engine.validation import InvalidTypeError, InvalidValueError

Prompt = str | list[int] | dict
_DICT_KEYS = {"prompt", "prompt_token_ids"}


def _is_token_id(t: Any) -> bool:
    return isinstance(t, (numbers.Integral, np.integer)) and not isinstance(t, (bool, np.bool_))


def _token_ids(ids: Any, where: str) -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InvalidTypeError(f"{where}: a numpy array of token ids must be 1-D, got shape {ids.shape}")
        ids = ids.tolist() if np.issubdtype(ids.dtype, np.integer) else list(ids)
    if not isinstance(ids, (list, tuple)):
        raise InvalidTypeError(f"{where}: token ids must be a list of ints, got {type(ids).__name__}")
    bad = next((i for i, t in enumerate(ids) if not _is_token_id(t)), None)
    if bad is not None:
        raise InvalidTypeError(f"{where}[{bad}]={ids[bad]!r}: a token id must be an int "
                               f"(not {type(ids[bad]).__name__})")
    return [int(t) for t in ids]


def parse_prompt(prompt: Any, where: str = "prompt") -> tuple[str | None, list[int] | None]:
    """(text, token ids); ids None means the text is still to be tokenized."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        unknown = sorted(set(map(str, prompt)) - _DICT_KEYS)
        if unknown:
            raise InvalidValueError(f"{where}: unknown keys {unknown}; a prompt dict has "
                                    f"'prompt_token_ids' and/or 'prompt'")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise InvalidTypeError(f"{where}['prompt']={text!r:.80}: must be a string")
        if "prompt_token_ids" in prompt:
            return text, _token_ids(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']")
        if text is None:
            raise InvalidValueError(f"{where}: a prompt dict needs 'prompt_token_ids' or 'prompt'")
        return text, None
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return None, _token_ids(prompt, where)
    raise InvalidTypeError(f"{where}={prompt!r:.80} must be a string, a list of token ids, "
                           f"or a dict with 'prompt_token_ids' or 'prompt' (got {type(prompt).__name__})")


def as_prompt_list(prompts: Any) -> list:
    """One prompt or a sequence of them -> a list of prompts, each checked (errors name prompts[i])."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple, np.ndarray)):
        prompts = list(prompts)
        if prompts and all(_is_token_id(t) or isinstance(t, (bool, np.bool_)) for t in prompts):
            prompts = [prompts]  # one prompt given as token ids (bools are refused below)
    else:
        raise InvalidTypeError(f"prompts={prompts!r:.80} must be a prompt or a list of prompts "
                               f"(got {type(prompts).__name__})")
    for i, p in enumerate(prompts):
        parse_prompt(p, f"prompts[{i}]")
    return prompts
