"""Engine-wide settings: strict, checked before anything is loaded, immutable afterwards."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from model_executor.model_loader import LOAD_FORMATS
from sparsed_engine.sampling_params import KV_CACHE_MODES
from sparsed_engine.validation import OptionalDict, StrictModel, type_error

# A small LLaDA-architecture DLM trained for this project (examples/train_tiny_dlm.py), shipped so
# that the engine runs out of the box and SparseD's fidelity can be measured on real attention.
DEFAULT_MODEL = Path(__file__).with_name("default_model")

DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)
EXECUTOR_BACKENDS = ("uni", "ray", "mp")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

PositiveInt = Annotated[int, Field(ge=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class EngineConfig(StrictModel):
    """Everything `LLM(...)` and the CLI accept about the engine (not about one request)."""

    model: NonEmptyStr
    """Local Hugging Face model folder (config.json, safetensors weights, tokenizer files); LLM() and
    the CLI default to the bundled tiny LLaDA."""
    tokenizer: NonEmptyStr | None = None
    """Tokenizer folder (None: the model folder)."""
    dtype: Annotated[Any, Field(json_schema_extra={"choices": DTYPE_NAMES})] = "auto"
    """Weights and activations dtype, by name or a torch floating dtype (auto: the checkpoint's
    half-precision dtype on GPU, float32 on CPU)."""
    device: NonEmptyStr = "auto"
    """auto (CUDA when available), cpu, or cuda[:N]."""
    max_model_len: PositiveInt | None = None
    """Longest prompt + max_tokens accepted (None: the model's trained length)."""
    attention_backend: NonEmptyStr | None = None
    """Attention backend by name (dense, sparsed, or one a package installs; None:
    $SPARSED_ATTENTION_BACKEND, else dense)."""
    attention_config: OptionalDict = None
    """Engine-wide settings of the attention backend, e.g. SparseD's {"skip": 0.2, "select": 0.3}."""
    mask_pool_bytes: Annotated[int, Field(ge=0)] | None = None
    """Bytes of the sparse-pattern pool per worker (None: mask_pool_fraction of free memory)."""
    mask_pool_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05
    """Fraction of free device memory the pattern pool takes when mask_pool_bytes is None."""
    mask_pool_block_bytes: PositiveInt = 1 << 16
    """Bytes of one pattern pool block (the unit of allocation)."""
    kv_cache: Literal[KV_CACHE_MODES] = "none"
    """Throughput mode of requests that name none (SamplingParams.kv_cache): none (exact: every step
    recomputes the whole canvas), prefix or dual (Fast-dLLM's block-wise KV cache, approximate: the
    first step of each semi-AR block stores every layer's K/V, the others recompute only the block,
    plus everything after it with prefix). Any mode but none allocates the KV pool."""
    kv_cache_bytes: Annotated[int, Field(ge=0)] | None = None
    """Bytes of the paged KV pool per worker (None: kv_cache_memory_fraction of the free memory);
    setting it allocates the pool even when kv_cache is none (for requests that ask for a cache)."""
    kv_cache_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Fraction of the device memory left free by the model and the pattern pool that the KV pool
    takes when kv_cache_bytes is None (never more pages than the token budget could fill)."""
    kv_cache_page_size: PositiveInt = 64
    """Tokens per KV page (the unit of allocation of the KV pool)."""
    max_num_seqs: PositiveInt = 256
    """Most requests denoised together in one step."""
    max_num_batched_tokens: PositiveInt | None = None
    """Most canvas tokens in one step (None: max(16384, max_model_len))."""
    load_format: Literal[LOAD_FORMATS] = "auto"
    """How weights are read (dummy: random weights, for benchmarks)."""
    trust_remote_code: bool = False
    """Allow the model folder's own Python code (tokenizer classes) to run; never done otherwise."""
    skip_tokenizer_init: bool = False
    """Load no tokenizer: prompts must be token ids and outputs carry no text."""
    sequence_parallel_size: PositiveInt = 1
    """GPUs (or CPU ranks) one sequence is spread over (Ulysses sequence parallelism)."""
    distributed_executor_backend: Literal[EXECUTOR_BACKENDS] | None = None
    """uni (one in-process worker), ray or mp (local processes); None: uni for one rank, ray for more."""

    @model_validator(mode="before")
    @classmethod
    def _paths_and_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for name in ("model", "tokenizer"):  # a pathlib.Path is a fine folder name
                if isinstance(data.get(name), os.PathLike):
                    data[name] = os.fspath(data[name])
            sp = data.get("sequence_parallel_size", 1)
            if data.get("distributed_executor_backend") is None and type(sp) is int:
                data["distributed_executor_backend"] = "uni" if sp == 1 else "ray"
        return data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        if isinstance(v, torch.dtype):
            if not v.is_floating_point:
                raise ValueError(f"{v} is not a floating-point dtype")
            return v
        if not isinstance(v, str):
            raise type_error("must be a dtype name or a torch floating dtype")
        if v not in DTYPE_NAMES:
            raise ValueError(f"choose from {', '.join(DTYPE_NAMES)}")
        return v

    @field_validator("device", mode="after")
    @classmethod
    def _device(cls, v):
        if not _DEVICE.fullmatch(v):
            raise ValueError("choose auto, cpu or cuda[:N]")
        if v.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        return v

    def check(self) -> None:
        sp, backend = self.sequence_parallel_size, self.distributed_executor_backend
        if backend == "uni" and sp > 1:
            raise self.bad("distributed_executor_backend",
                           f"'uni' runs one worker; sequence_parallel_size={sp} needs 'ray' or 'mp'")
        if backend == "ray" and importlib.util.find_spec("ray") is None:
            raise self.bad("distributed_executor_backend", "Ray is not installed: pip install 'sparsed-engine[ray]'")

    @property
    def wants_kv_pool(self) -> bool:
        """The KV pool is allocated only for a cache mode by default or a size given."""
        return self.kv_cache != "none" or self.kv_cache_bytes is not None

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """auto: the checkpoint's half-precision dtype on GPU (bf16 if it has none), float32 on CPU."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolved_device() == "cpu":
            return torch.float32
        dt = DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
        return dt if dt != torch.float32 else torch.bfloat16
