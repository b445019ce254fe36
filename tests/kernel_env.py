"""Where the Triton kernel tests run: compiled on the GPU when there is one, else in the Triton
interpreter on CPU tensors (tests/conftest.py chooses the interpreter only where CUDA is absent)."""
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter has no bf16 arithmetic (numpy has no bfloat16): bf16 runs compiled only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="no bf16 in the Triton interpreter"))
KERNEL_DTYPES = [torch.float32, torch.float16, BF16]


def tolerance(dtype: torch.dtype, fp32: float, fp16: float, bf16: float) -> float:
    """A test's stated tolerance for the kernel's input precision."""
    return {torch.float32: fp32, torch.float16: fp16, torch.bfloat16: bf16}[dtype]
