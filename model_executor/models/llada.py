"""LLaDA (GSAI-ML/LLaDA-8B-*): an OLMo "llama" block stack with bidirectional attention.

Mirrors the official `modeling_llada.py` (LLaDALlamaBlock): pre-norm RMSNorm blocks,
separate q/k/v projections, RoPE applied in float32 (`rope_full_precision`), no causal mask,
SwiGLU MLP (silu(ff_proj(x)) * up_proj(x) -> ff_out), final `ln_f`, and an `ff_out` head over
`embedding_size` rows (or the tied `wte`). Parameter names are the checkpoint's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from attention_backends.base import AttentionBackend, AttentionLayout
from model_executor.denoisers.llada import LLaDADenoiser
from model_executor.layers.mlp import swiglu
from model_executor.layers.rms_norm import RMSNorm
from model_executor.layers.rotary import apply_rotary, rotary_cos_sin
from model_executor.layers.weights import load_named_tensors
from model_executor.models.base import DiffusionLM, ModelFamily


def _require(config: dict, key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"LLaDA config.json lacks required key {key!r}")
    return config[key]


@dataclass(frozen=True)
class LLaDAArgs:
    """The config.json fields the model uses; defaults are the official ModelConfig's."""
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    logits_size: int        # embedding_size: rows of wte and of the head, >= vocab_size
    max_len: int
    rope_theta: float
    rope_full_precision: bool
    eps: float
    qkv_bias: bool
    bias: bool
    norm_bias: bool
    weight_tying: bool
    input_emb_norm: bool
    scale_logits: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, config: dict) -> "LLaDAArgs":
        # Options the official code supports but LLaDA checkpoints never use are refused
        # rather than silently computed differently.
        expected = {"block_type": ("llama", "sequential"), "layer_norm_type": ("rms", "default"),
                    "activation_type": ("silu", "swiglu"), "rope": (True, False), "alibi": (False, False),
                    "attention_layer_norm": (False, False), "clip_qkv": (None, None),
                    "layer_norm_with_affine": (True, True), "block_group_size": (1, 1)}
        for key, (want, default) in expected.items():
            got = config.get(key, default)
            if got != want:
                raise ValueError(f"LLaDA config {key}={got!r} is not supported (only {want!r}, as in LLaDA-8B)")
        d_model, n_heads = _require(config, "d_model"), _require(config, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"LLaDA d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv = config.get("n_kv_heads") or (1 if config.get("multi_query_attention") else n_heads)
        if n_heads % n_kv:
            raise ValueError(f"LLaDA n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
        vocab = _require(config, "vocab_size")
        emb = config.get("embedding_size") or vocab
        if emb < vocab:
            raise ValueError(f"LLaDA embedding_size={emb} is smaller than vocab_size={vocab}")
        bias = bool(config.get("include_bias", False))
        norm_bias = config.get("bias_for_layer_norm")
        return cls(
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, n_layers=_require(config, "n_layers"),
            mlp_hidden_size=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d_model,
            vocab_size=vocab, logits_size=emb, max_len=_require(config, "max_sequence_length"),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_full_precision=bool(config.get("rope_full_precision", True)),
            eps=float(config.get("rms_norm_eps", 1e-5)),
            qkv_bias=bias or bool(config.get("include_qkv_bias", False)), bias=bias,
            norm_bias=bias if norm_bias is None else bool(norm_bias),
            weight_tying=bool(config.get("weight_tying", False)),
            input_emb_norm=bool(config.get("input_emb_norm", False)),
            scale_logits=bool(config.get("scale_logits", False)),
        )


class LLaDABlock(nn.Module):
    def __init__(self, a: LLaDAArgs, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.a, self.layer_idx, self.backend = a, layer_idx, backend
        kv_dim = a.n_kv_heads * a.head_dim
        self.attn_norm = RMSNorm(a.d_model, a.eps, a.norm_bias)
        self.ff_norm = RMSNorm(a.d_model, a.eps, a.norm_bias)
        self.q_proj = nn.Linear(a.d_model, a.d_model, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.d_model, kv_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.d_model, kv_dim, bias=a.qkv_bias)
        self.attn_out = nn.Linear(a.d_model, a.d_model, bias=a.bias)
        self.ff_proj = nn.Linear(a.d_model, a.mlp_hidden_size, bias=a.bias)
        self.up_proj = nn.Linear(a.d_model, a.mlp_hidden_size, bias=a.bias)
        self.ff_out = nn.Linear(a.mlp_hidden_size, a.d_model, bias=a.bias)

    def forward(self, x, cos, sin, attn_metadata):
        a, t = self.a, x.shape[0]
        h = self.attn_norm(x)
        q = self.q_proj(h).view(t, a.n_heads, a.head_dim)
        k = self.k_proj(h).view(t, a.n_kv_heads, a.head_dim)
        v = self.v_proj(h).view(t, a.n_kv_heads, a.head_dim)
        q = apply_rotary(q, cos, sin, a.rope_full_precision)
        k = apply_rotary(k, cos, sin, a.rope_full_precision)
        att = self.backend.forward(q, k, v, attn_metadata, self.layer_idx)
        x, h = self.ff_norm.add_forward(x, self.attn_out(att.reshape(t, a.d_model)))
        return x + swiglu(h, self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModelLM(DiffusionLM):
    logits_shift = LLaDADenoiser.logits_shift
    default_mask_token_id = 126336   # the id the official generate.py hard-codes

    def __init__(self, config: dict, backend: AttentionBackend):
        super().__init__()
        a = self.args = LLaDAArgs.from_config(config)
        self.backend = backend
        transformer = nn.ModuleDict({
            "wte": nn.Embedding(a.logits_size, a.d_model),
            "blocks": nn.ModuleList(LLaDABlock(a, i, backend) for i in range(a.n_layers)),
            "ln_f": RMSNorm(a.d_model, a.eps, a.norm_bias),
        })
        if not a.weight_tying:
            transformer["ff_out"] = nn.Linear(a.d_model, a.logits_size, bias=a.bias)
        self.model = nn.Module()
        self.model.transformer = transformer

    @staticmethod
    def parse_config(config: dict) -> LLaDAArgs:
        return LLaDAArgs.from_config(config)

    @staticmethod
    def attention_layout(config: dict) -> AttentionLayout:
        a = LLaDAArgs.from_config(config)
        return AttentionLayout(num_layers=a.n_layers, num_heads=a.n_heads, num_kv_heads=a.n_kv_heads,
                               head_dim=a.head_dim, scale=1.0 / math.sqrt(a.head_dim), total_heads=a.n_heads,
                               selection_scale="num_heads")  # as the LLaDA SparseD reference

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        a, t = self.args, self.model.transformer
        x = t.wte(input_ids)
        if a.input_emb_norm:
            x = x * (a.d_model ** 0.5)
        cos, sin = rotary_cos_sin(positions, a.head_dim, a.rope_theta)
        for block in t.blocks:
            x = block(x, cos, sin, attn_metadata)
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor, token_indices: torch.Tensor) -> torch.Tensor:
        """float32 logits over all `embedding_size` rows, as the official head returns them."""
        a, t = self.args, self.model.transformer
        h = hidden[token_indices]
        logits = F.linear(h, t.wte.weight) if a.weight_tying else t.ff_out(h)
        if a.scale_logits:
            logits = logits * (1 / math.sqrt(a.d_model))
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_tensors(self, weights)


LLADA = ModelFamily("llada", LLaDAModelLM, LLaDADenoiser(),
                      architectures=("LLaDAModelLM",), model_types=("llada",))
