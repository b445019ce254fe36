"""Checks of a model folder's contents made before they are used: config values, the shard index,
weight dtypes and the tokenizer file. Each error names the file and the value at fault."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from attention_backends.base import AttentionLayout

# Size fields of the families' config.json files (LLaDA's and Qwen2/Dream's names): where present
# they must be positive integers, checked before any arithmetic (a zero head count divides by zero).
SIZE_KEYS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio", "vocab_size",
             "embedding_size", "max_sequence_length", "hidden_size", "num_attention_heads",
             "num_key_value_heads", "num_hidden_layers", "intermediate_size", "max_position_embeddings")
POSITIVE_FLOAT_KEYS = ("rope_theta", "rms_norm_eps", "layer_norm_eps")


def check_config_values(config: dict, config_path: Path) -> None:
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{config_path}: {key}={value!r} must be an integer, not {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{config_path}: {key}={value!r} must be a positive integer")
    for key in POSITIVE_FLOAT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{config_path}: {key}={value!r} must be a number, not {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{config_path}: {key}={value!r} must be a finite number > 0")


def check_model_shape(config_path: Path, vocab_size: int, max_len: int, layout: AttentionLayout) -> None:
    """What the engine relies on, whatever the family's config names are."""
    facts = {"vocab size": vocab_size, "max sequence length": max_len, "layers": layout.num_layers,
             "attention heads": layout.num_heads, "key/value heads": layout.num_kv_heads,
             "head dim": layout.head_dim}
    for what, value in facts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{config_path}: the model's {what} is {value!r}; it must be a positive integer")
    if layout.num_heads % layout.num_kv_heads:
        raise ValueError(f"{config_path}: {layout.num_heads} attention heads are not a multiple of "
                         f"{layout.num_kv_heads} key/value heads")


def check_shard_names(model_dir: Path, index: Path, weight_map: dict) -> None:
    """Every file the index names is a plain file name inside the model folder."""
    root = model_dir.resolve()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{index}: weight_map[{tensor!r}]={name!r} must be a file name")
        target = (model_dir / name).resolve()
        if target.parent != root and root not in target.parents:
            raise ValueError(f"{index}: weight_map[{tensor!r}]={name!r} lies outside the model folder {model_dir}")


def check_weight(name: str, tensor: torch.Tensor, file: Path) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{file}: tensor {name!r} is {tensor.dtype}; model weights must be floating point")


def check_tokenizer_inputs(model_dir: Path, trust_remote_code) -> None:
    """trust_remote_code is a real bool (any truthy string would otherwise run the folder's code),
    and tokenizer.json, where present, is a JSON object (a corrupt file is named, not a parser trace)."""
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code={trust_remote_code!r} must be True or False, "
                        f"not {type(trust_remote_code).__name__}")
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        return
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupt (not valid JSON): {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{file} is corrupt: not a tokenizers JSON object with a 'model'")
