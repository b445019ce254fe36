"""Shared fixtures: tiny real-format checkpoints, built once per test session."""
import pytest

from tests.tiny_checkpoints import write_tiny_dream, write_tiny_llada


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("tiny_llada"))


@pytest.fixture(scope="session")
def tiny_dream_dir(tmp_path_factory):
    return write_tiny_dream(tmp_path_factory.mktemp("tiny_dream"))
