"""Dream (Dream-org/Dream-v0-*-7B): a Qwen2 stack run with bidirectional attention.

Mirrors the official `modeling_dream.py`: pre-norm RMSNorm layers, q/k/v projections with
bias and grouped KV heads, RoPE with cos/sin cast to the activation dtype, no causal mask,
SwiGLU MLP, final `norm`, `lm_head` (or the tied embedding). Dream was adapted from an
autoregressive model, so the logit for canvas position i is read from hidden state i-1
(its denoiser's `logits_shift = 1`; the official generate does `cat([logits[:, :1], logits[:, :-1]], 1)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from attention_backends.base import AttentionBackend, AttentionLayout
from model_executor.denoisers.dream import DreamDenoiser
from model_executor.layers.mlp import swiglu
from model_executor.layers.rms_norm import RMSNorm
from model_executor.layers.rotary import apply_rotary, rotary_cos_sin
from model_executor.layers.weights import load_named_tensors
from model_executor.models.base import DiffusionLM, ModelFamily


def _require(config: dict, key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"Dream config.json lacks required key {key!r}")
    return config[key]


@dataclass(frozen=True)
class DreamArgs:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    logits_size: int        # rows of lm_head: equal to vocab_size for Dream
    max_len: int
    rope_theta: float
    eps: float
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: dict) -> "DreamArgs":
        # Qwen2 options the Dream checkpoints leave off; refused rather than silently ignored.
        if config.get("rope_scaling") is not None:
            raise ValueError(f"Dream config rope_scaling={config['rope_scaling']!r} is not supported (only null)")
        if config.get("use_sliding_window"):
            raise ValueError("Dream config use_sliding_window=true is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Dream config hidden_act={config['hidden_act']!r} is not supported (only 'silu')")
        hidden, heads = _require(config, "hidden_size"), _require(config, "num_attention_heads")
        if hidden % heads:
            raise ValueError(f"Dream hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        kv = config.get("num_key_value_heads") or heads
        if heads % kv:
            raise ValueError(f"Dream num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        vocab = _require(config, "vocab_size")
        return cls(
            hidden_size=hidden, intermediate_size=_require(config, "intermediate_size"), num_heads=heads,
            num_kv_heads=kv, num_layers=_require(config, "num_hidden_layers"), vocab_size=vocab,
            logits_size=vocab, max_len=_require(config, "max_position_embeddings"),
            rope_theta=float(config.get("rope_theta", 10000.0)), eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class DreamAttention(nn.Module):
    def __init__(self, a: DreamArgs, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.a, self.layer_idx, self.backend = a, layer_idx, backend
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=True)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=True)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=True)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_metadata):
        a, t = self.a, x.shape[0]
        q = self.q_proj(x).view(t, a.num_heads, a.head_dim)
        k = self.k_proj(x).view(t, a.num_kv_heads, a.head_dim)
        v = self.v_proj(x).view(t, a.num_kv_heads, a.head_dim)
        q = apply_rotary(q, cos, sin, full_precision=False)
        k = apply_rotary(k, cos, sin, full_precision=False)
        att = self.backend.forward(q, k, v, attn_metadata, self.layer_idx)
        return self.o_proj(att.reshape(t, a.num_heads * a.head_dim))


class DreamMLP(nn.Module):
    def __init__(self, a: DreamArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class DreamDecoderLayer(nn.Module):
    def __init__(self, a: DreamArgs, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.eps)
        self.self_attn = DreamAttention(a, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.eps)
        self.mlp = DreamMLP(a)

    def forward(self, x, cos, sin, attn_metadata):
        att = self.self_attn(self.input_layernorm(x), cos, sin, attn_metadata)
        x, h = self.post_attention_layernorm.add_forward(x, att)  # residual add + norm, one pass
        return x + self.mlp(h)


class DreamModel(DiffusionLM):
    logits_shift = DreamDenoiser.logits_shift
    default_mask_token_id = None   # must come from config.json / generation_config.json

    def __init__(self, config: dict, backend: AttentionBackend):
        super().__init__()
        a = self.args = DreamArgs.from_config(config)
        self.backend = backend
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.model.layers = nn.ModuleList(DreamDecoderLayer(a, i, backend) for i in range(a.num_layers))
        self.model.norm = RMSNorm(a.hidden_size, a.eps)
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    @staticmethod
    def parse_config(config: dict) -> DreamArgs:
        return DreamArgs.from_config(config)

    @staticmethod
    def attention_layout(config: dict) -> AttentionLayout:
        a = DreamArgs.from_config(config)
        return AttentionLayout(num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                               head_dim=a.head_dim, scale=1.0 / math.sqrt(a.head_dim), total_heads=a.num_heads)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        a, m = self.args, self.model
        x = m.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, a.head_dim, a.rope_theta)
        for layer in m.layers:
            x = layer(x, cos, sin, attn_metadata)
        return m.norm(x)

    def compute_logits(self, hidden: torch.Tensor, token_indices: torch.Tensor) -> torch.Tensor:
        """float32 logits for the asked tokens, read from the hidden state one position earlier
        in the same row (callers never ask for a row's first token)."""
        h = hidden[token_indices - self.logits_shift]
        weight = self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Older Qwen2-format exports may carry the (recomputed, never learned) RoPE buffer.
        load_named_tensors(self, weights, ignore_suffixes=("rotary_emb.inv_freq",))


DREAM = ModelFamily("dream", DreamModel, DreamDenoiser(),
                      architectures=("DreamModel",), model_types=("dream",))
