"""Shared fixtures: tiny real-format checkpoints, built once per test session."""
import os

import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before the
# first import of a kernel module, whichever test module imports one first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sparsed_engine import LLM  # noqa: E402
from tests.tiny_checkpoints import write_tiny_dream, write_tiny_llada  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("tiny_llada"))


@pytest.fixture(scope="session")
def tiny_dream_dir(tmp_path_factory):
    return write_tiny_dream(tmp_path_factory.mktemp("tiny_dream"))


# One engine per test module on each tiny checkpoint (modules that need their own options build their own).
@pytest.fixture(scope="module")
def llada(tiny_llada_dir):
    return LLM(model=str(tiny_llada_dir))


@pytest.fixture(scope="module")
def dream(tiny_dream_dir):
    return LLM(model=str(tiny_dream_dir))
