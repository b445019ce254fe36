"""A local Hugging Face model folder -> model info, tokenizer and a loaded model.

Nothing downloads: the folder must hold config.json, safetensors weights (one file, or shards
named by model.safetensors.index.json) and tokenizer files. Every problem is reported with the
file or value at fault before any weights are read where possible.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from attention_backends.base import AttentionBackend, AttentionLayout
from model_executor import checkpoint_checks as checks
from model_executor.layers.rms_norm import RMSNorm
from model_executor.families import resolve_family

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token", "additional_special_tokens")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: dict
    generation_config: dict
    model_class: type
    family: str                       # the ModelFamily's name (model_executor.families)
    mask_token_id: int
    eos_token_ids: tuple[int, ...]    # config.json's and generation_config.json's, in that order
    vocab_size: int                   # config vocab_size (LLaDA logits span embedding_size >= this)
    max_model_len: int
    torch_dtype: str | None           # the checkpoint's stored dtype, as config.json names it
    attention_layout: AttentionLayout


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_ids(value, source: str) -> list[int]:
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source} eos_token_id must be an int or a list of ints, got {value!r}")
    return ids


def read_model_info(model_dir: str | Path) -> ModelInfo:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist or is not a directory")
    config_path = path / "config.json"
    config = _read_json(config_path, required=True)
    gen_path = path / "generation_config.json"
    generation_config = _read_json(gen_path, required=False)
    checks.check_config_values(config, config_path)
    try:
        family = resolve_family(config)
        cls = family.model_class
        args = cls.parse_config(config)
        layout = cls.attention_layout(config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
    checks.check_model_shape(config_path, args.vocab_size, args.max_len, layout)

    mask = config.get("mask_token_id")
    if mask is None:
        mask = generation_config.get("mask_token_id")
    if mask is None:
        mask = cls.default_mask_token_id
    if mask is None:
        raise ValueError(f"{config_path}: mask_token_id is absent (also from {gen_path.name}); "
                         f"a {family.name} model needs it to build canvases")
    if not isinstance(mask, int) or not 0 <= mask < args.logits_size:
        raise ValueError(f"{config_path}: mask_token_id={mask!r} is outside the model's "
                         f"{args.logits_size} token embeddings")

    eos = _token_ids(config.get("eos_token_id"), str(config_path))
    eos += _token_ids(generation_config.get("eos_token_id"), str(gen_path))
    return ModelInfo(
        path=path, config=config, generation_config=generation_config, model_class=cls,
        family=family.name, mask_token_id=mask, eos_token_ids=tuple(dict.fromkeys(eos)),
        vocab_size=args.vocab_size, max_model_len=args.max_len,
        torch_dtype=config.get("torch_dtype") or config.get("dtype"), attention_layout=layout)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer from the folder; if that fails (real Dream folders name a remote-code
    tokenizer class) and tokenizer.json exists, a PreTrainedTokenizerFast built from it with
    the special tokens and chat template of tokenizer_config.json."""
    from transformers import AutoTokenizer

    path = Path(model_dir).expanduser()
    checks.check_tokenizer_inputs(path, trust_remote_code)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {path} (looked for {', '.join(_TOKENIZER_FILES)})")
    try:
        # AutoTokenizer also parses config.json, whose model types transformers does not know:
        # its complaints about that are noise for a tokenizer-only load.
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    except Exception as e:  # any failure: unknown class, remote code refused, missing module
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"cannot load the tokenizer in {path}: {e}") from e
        logger.info("AutoTokenizer failed for %s (%s); using tokenizer.json directly", path, e)
    return _tokenizer_from_json(path)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _tokenizer_from_json(path: Path):
    from transformers import PreTrainedTokenizerFast

    cfg = _read_json(path / "tokenizer_config.json", required=False)

    def content(tok):   # tokenizer_config stores tokens as strings or AddedToken dicts
        return tok["content"] if isinstance(tok, dict) else tok

    kwargs = {}
    for key in _SPECIAL_TOKEN_KEYS:
        if cfg.get(key) is not None:
            value = cfg[key]
            kwargs[key] = [content(t) for t in value] if isinstance(value, list) else content(value)
    if "model_max_length" in cfg:
        kwargs["model_max_length"] = cfg["model_max_length"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _weight_files(path: Path) -> list[Path]:
    single, index = path / _SINGLE_FILE, path / _INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(f"no weights in {path}: expected {_SINGLE_FILE} or {_INDEX_FILE} "
                                "(load_format='dummy' gives random weights)")
    weight_map = _read_json(index, required=True).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object")
    checks.check_shard_names(path, index, weight_map)
    shards = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"shards named by {index} are missing: {', '.join(missing)}")
    return shards


def _stream_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield one tensor at a time, so host memory holds a single tensor, not the checkpoint."""
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError: truncated file, garbage header, ...
            raise ValueError(f"cannot read safetensors file {file}: {e}") from e
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from e
                checks.check_weight(name, tensor, file)
                yield name, tensor


@torch.no_grad()
def _fill_dummy(model: nn.Module, device: torch.device, seed: int = 0) -> None:
    """vLLM-style dummy weights, generated on the device: N(0, 0.02) everywhere except norms
    (weight 1, bias 0), from a fixed seed so runs are reproducible."""
    gen = torch.Generator(device=device).manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    norm_weights = {id(m.weight) for m in norms}
    norm_biases = {id(m.bias) for m in norms if m.bias is not None}
    for p in model.parameters():
        if id(p) in norm_weights:
            p.fill_(1.0)
        elif id(p) in norm_biases:
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating dtype (e.g. 'bfloat16', 'float32')")
    return resolved


def load_model(info: ModelInfo, backend: AttentionBackend, dtype: torch.dtype | str,
               device: torch.device | str, load_format: str = "auto") -> nn.Module:
    """Build the model directly on `device` in `dtype` and fill it; returns it in eval mode
    with gradients off."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
    dtype, device = _as_dtype(dtype), torch.device(device)
    files = None if load_format == "dummy" else _weight_files(info.path)
    # Built on the meta device then materialised uninitialised: no time spent on random init
    # that the checkpoint overwrites, and no float32 copy of a bf16 model. The strict loader
    # guarantees every parameter is then written.
    with torch.device("meta"):
        model = info.model_class(info.config, backend)
    model = model.to(dtype=dtype).to_empty(device=device)
    if files is None:
        _fill_dummy(model, device)
    else:
        model.load_weights(_stream_safetensors(files))
    return model.eval().requires_grad_(False)
