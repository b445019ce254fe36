"""Backends come from the entry-point group, the project's own and third parties' alike."""
import sys
import textwrap

import pytest

from attention_backends.registry import ENV_VAR, get_backend_class, installed_backends
from sparsed_engine import LLM, SamplingParams


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A throwaway installed distribution: its own dist-info with an entry point, on sys.path."""
    (tmp_path / "my_backend.py").write_text(textwrap.dedent("""
        from attention_backends.dense import DenseBackend

        class CountingBackend(DenseBackend):
            name = "counting"
            calls = 0

            def forward(self, q, k, v, metadata, layer):
                type(self).calls += 1
                return super().forward(q, k, v, metadata, layer)
    """))
    info = tmp_path / "my_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[sparsed_engine.attention_backends]\ncounting = my_backend:CountingBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_backend", None)


def test_builtins_registered_through_entry_points():
    assert {"dense", "sparsed"} <= set(installed_backends())
    assert get_backend_class("sparsed").name == "sparsed"


def test_third_party_backend_selected_by_name(third_party, tiny_llada_dir):
    assert "counting" in installed_backends()
    llm = LLM(model=str(tiny_llada_dir), attention_backend="counting")
    dense = LLM(model=str(tiny_llada_dir))
    p = SamplingParams(max_tokens=8, steps=4)
    out = llm.generate("Hello", p, use_tqdm=False)[0]
    cls = get_backend_class("counting")
    assert cls.calls == 4 * llm.llm_engine.layout.num_layers
    assert out.outputs[0].token_ids == dense.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids


def test_env_var_selects_backend(monkeypatch, tiny_llada_dir):
    monkeypatch.setenv(ENV_VAR, "sparsed")
    assert LLM(model=str(tiny_llada_dir), mask_pool_bytes=1 << 16).get_stats()["backend"] == "sparsed"
    monkeypatch.setenv(ENV_VAR, "missing")
    with pytest.raises(ValueError, match="unknown attention backend 'missing'; installed backends: .*dense"):
        LLM(model=str(tiny_llada_dir))
