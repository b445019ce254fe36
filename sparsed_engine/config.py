"""Engine-wide settings, checked before anything is loaded."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

EXECUTOR_BACKENDS = ("uni", "ray", "mp")


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    attention_backend: str | None = None       # None: $SPARSED_ATTENTION_BACKEND, else "dense"
    attention_config: dict | None = None
    mask_pool_bytes: int | None = None         # None: mask_pool_fraction of free memory
    mask_pool_fraction: float = 0.05
    mask_pool_block_bytes: int = 1 << 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(16384, max_model_len)
    load_format: str = "auto"
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False          # True: prompts must be token ids, outputs carry no text
    sequence_parallel_size: int = 1            # GPUs (or CPU ranks) one sequence is spread over
    distributed_executor_backend: str | None = None  # "uni" | "ray" | "mp"; None: uni for 1 rank, ray for more

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if self.dtype != "auto" and self.dtype not in _DTYPES and not isinstance(self.dtype, torch.dtype):
            bad("dtype", f"choose from auto, {', '.join(_DTYPES)}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            bad("device", "choose auto, cpu or cuda[:N]")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            bad("device", "CUDA is not available on this machine")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            bad("max_model_len", "must be a positive integer")
        if self.mask_pool_bytes is not None and self.mask_pool_bytes < 0:
            bad("mask_pool_bytes", "must be >= 0")
        if not 0 < self.mask_pool_fraction <= 1:
            bad("mask_pool_fraction", "must be in (0, 1]")
        if self.mask_pool_block_bytes < 1:
            bad("mask_pool_block_bytes", "must be >= 1")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "must be >= 1")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            bad("load_format", "choose auto, safetensors or dummy")
        if self.attention_config is not None and not isinstance(self.attention_config, dict):
            bad("attention_config", "must be a dict")
        sp = self.sequence_parallel_size
        if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
            bad("sequence_parallel_size", "must be a positive integer")
        if self.distributed_executor_backend is None:
            self.distributed_executor_backend = "uni" if sp == 1 else "ray"
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            bad("distributed_executor_backend", f"choose from {', '.join(EXECUTOR_BACKENDS)}")
        if self.distributed_executor_backend == "uni" and sp > 1:
            bad("distributed_executor_backend", f"'uni' runs one worker; sequence_parallel_size={sp} needs 'ray' or 'mp'")
        if self.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
            bad("distributed_executor_backend", "Ray is not installed: pip install 'sparsed-engine[ray]'")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """auto: the checkpoint's half-precision dtype on GPU (bf16 if it has none), float32 on CPU."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.resolved_device() == "cpu":
            return torch.float32
        dt = _DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
        return dt if dt != torch.float32 else torch.bfloat16
