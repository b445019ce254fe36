"""The fused elementwise kernels have no backward, so a training forward (grad enabled) must take
the torch references: through the kernels only the LM head got a gradient, and a CUDA training
run fitted unigram statistics with perfectly uniform attention (examples/train_long_dlm.py)."""
import json

import pytest
import torch
import torch.nn.functional as F

from attention_backends.base import AttentionBackend
from model_executor.layers import fused_dispatch, fused_elementwise
from model_executor.models.llada import LLaDAModelLM

from tests.kernel_env import DEVICE


class _OneRowSDPA(AttentionBackend):
    name = "one_row_sdpa"

    def build_metadata(self, rows):
        return rows

    def forward(self, q, k, v, metadata, layer: int):
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), scale=self.layout.scale)
        return out.transpose(0, 1)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Dispatch as on CUDA, also for CPU tensors (the Triton interpreter runs the kernels on them)."""
    if DEVICE.type != "cuda":
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def _model(tiny_llada_dir):
    config = json.loads((tiny_llada_dir / "config.json").read_text())
    torch.manual_seed(0)
    model = LLaDAModelLM(config, _OneRowSDPA(LLaDAModelLM.attention_layout(config), DEVICE, torch.float32))
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.02 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return model.to(DEVICE), config


def test_training_forward_gives_every_weight_a_gradient(tiny_llada_dir, fused_everywhere):
    model, config = _model(tiny_llada_dir)
    ids = torch.randint(0, config["vocab_size"] - 1, (24,), device=DEVICE)
    hidden = model(ids, torch.arange(24, device=DEVICE), 1)
    loss = F.cross_entropy(model.compute_logits(hidden, torch.arange(24, device=DEVICE)), ids)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_inference_forward_still_runs_the_kernels(fused_everywhere):
    x = torch.ones(2, 8, device=DEVICE)
    with torch.inference_mode():
        assert fused_dispatch.fused_kernels(x) is fused_elementwise
    with torch.no_grad():
        assert fused_dispatch.fused_kernels(x) is fused_elementwise
    assert fused_dispatch.fused_kernels(x) is None
