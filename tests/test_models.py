"""LLaDA and Dream vs an independent float64 re-implementation written from the official code.

The reference reads the safetensors file itself and spells every step out (explicit RoPE
angles per dimension pair, softmax attention with the KV head of each query head looked up
by index), so a wrong name mapping, head split, RoPE layout, bias, norm or shift shows up.
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from attention_backends.base import RowSpec
from attention_backends.dense import DenseBackend
from model_executor import load_model, read_model_info
from model_executor.layers.rms_norm import RMSNorm
from model_executor.layers.rotary import apply_rotary, rotary_cos_sin
from tests.tiny_checkpoints import write_tiny_dream, write_tiny_llada

# Parameter names of one layer / the whole model, per family: (prefix, attn_norm, q, k, v, o,
# ff_norm, gate, up, down) and (embed, final norm, head).
LLADA = dict(layer="model.transformer.blocks.{i}.", names=("attn_norm", "q_proj", "k_proj", "v_proj",
             "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"),
             embed="model.transformer.wte.weight", norm="model.transformer.ln_f",
             head="model.transformer.ff_out")
DREAM = dict(layer="model.layers.{i}.", names=("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"),
             embed="model.embed_tokens.weight", norm="model.norm", head="lm_head")


def reference(folder, ids):
    """Hidden states [L, d] and logits [L, V] of one row, float64, no shift applied."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    if "d_model" in cfg:
        spec, d, nh, nkv, layers = LLADA, cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"]
        theta, eps, tied = cfg["rope_theta"], cfg["rms_norm_eps"], cfg["weight_tying"]
    else:
        spec, d, nh = DREAM, cfg["hidden_size"], cfg["num_attention_heads"]
        nkv, layers = cfg["num_key_value_heads"], cfg["num_hidden_layers"]
        theta, eps, tied = cfg["rope_theta"], cfg["rms_norm_eps"], cfg["tie_word_embeddings"]
    hd, n = d // nh, len(ids)

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    def norm(x, name):
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w[name + ".weight"]
        return y + w[name + ".bias"] if name + ".bias" in w else y

    def rope(x):  # x [L, H, hd]: rotate each pair (j, j + hd/2) by pos * theta^(-2j/hd)
        out = x.clone()
        for j in range(hd // 2):
            ang = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-2 * j / hd)
            a, b = x[..., j], x[..., j + hd // 2]
            out[..., j], out[..., j + hd // 2] = a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()
        return out

    x = w[spec["embed"]][ids]
    for i in range(layers):
        p = spec["layer"].format(i=i)
        an, q_, k_, v_, o_, fn, g_, u_, dn = (p + s for s in spec["names"])
        h = norm(x, an)
        q = rope(linear(h, q_).view(n, nh, hd))
        k = rope(linear(h, k_).view(n, nkv, hd))
        v = linear(h, v_).view(n, nkv, hd)
        att = torch.empty_like(q)
        for head in range(nh):
            kv = head // (nh // nkv)
            probs = torch.softmax(q[:, head] @ k[:, kv].T / math.sqrt(hd), dim=-1)  # no causal mask
            att[:, head] = probs @ v[:, kv]
        x = x + linear(att.reshape(n, d), o_)
        h = norm(x, fn)
        gate = linear(h, g_)
        x = x + linear(gate * torch.sigmoid(gate) * linear(h, u_), dn)
    hidden = norm(x, spec["norm"])
    return hidden, hidden @ w[spec["embed"]].T if tied else linear(hidden, spec["head"])


def run(folder, rows, dtype=torch.float32):
    """Load the folder, run the given rows packed into one batch; returns (model, hidden)."""
    info = read_model_info(folder)
    backend = DenseBackend(info.attention_layout, "cpu", dtype)
    model = load_model(info, backend, dtype, "cpu")
    ids = torch.cat(rows)
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    meta = backend.build_metadata([RowSpec(length=len(r), prompt_len=len(r) // 2) for r in rows])
    with torch.inference_mode():
        return model, model(ids, positions, meta)


def some_ids(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


LLADA_VARIANTS = {
    "default": {},
    "tied": {"weight_tying": True},
    "gqa_bias_padded_head": {"n_kv_heads": 2, "include_bias": True, "embedding_size": 512},
    "qkv_bias_only": {"include_qkv_bias": True, "rope_theta": 500000.0},
}


@pytest.mark.parametrize("variant", LLADA_VARIANTS)
def test_llada_matches_reference(tmp_path, tiny_llada_dir, variant):
    folder = tiny_llada_dir if variant == "default" else write_tiny_llada(tmp_path, seed=1, **LLADA_VARIANTS[variant])
    ids = some_ids(37, read_model_info(folder).vocab_size, seed=0)
    model, hidden = run(folder, [ids])
    ref_hidden, ref_logits = reference(folder, ids)
    torch.testing.assert_close(hidden.double(), ref_hidden, rtol=1e-4, atol=1e-4)
    idx = torch.tensor([0, 5, 36, 12])
    logits = model.compute_logits(hidden, idx)
    assert logits.dtype == torch.float32 and logits.shape == (4, ref_logits.shape[1])
    torch.testing.assert_close(logits.double(), ref_logits[idx], rtol=1e-4, atol=1e-4)
    assert ref_logits[idx].std(-1).min() > 1.0   # the checkpoint is not degenerate


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": True}], ids=["default", "tied"])
def test_dream_matches_reference_with_shift(tmp_path, tiny_dream_dir, variant):
    folder = write_tiny_dream(tmp_path, seed=2, **variant) if variant else tiny_dream_dir
    ids = some_ids(29, read_model_info(folder).vocab_size, seed=1)
    model, hidden = run(folder, [ids])
    ref_hidden, ref_logits = reference(folder, ids)
    torch.testing.assert_close(hidden.double(), ref_hidden, rtol=1e-4, atol=1e-4)
    idx = torch.tensor([1, 7, 28, 15])
    # The logit asked for at canvas position i is the AR model's prediction from position i-1.
    torch.testing.assert_close(model.compute_logits(hidden, idx).double(), ref_logits[idx - 1],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_rows_equal_rows_alone(family, tiny_llada_dir, tiny_dream_dir):
    folder = tiny_llada_dir if family == "llada" else tiny_dream_dir
    vocab = read_model_info(folder).vocab_size
    a, b = some_ids(23, vocab, seed=3), some_ids(40, vocab, seed=4)
    model, packed = run(folder, [a, b])
    _, alone_a = run(folder, [a])
    _, alone_b = run(folder, [b])
    torch.testing.assert_close(packed[:23], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[23:], alone_b, rtol=1e-5, atol=1e-5)
    idx = torch.tensor([5, 22, 24, 62])   # rows' tokens, never a row's first
    torch.testing.assert_close(model.compute_logits(packed, idx)[2:],
                               model.compute_logits(alone_b, idx[2:] - 23), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bfloat16_stays_close_to_reference(family, tiny_llada_dir, tiny_dream_dir):
    folder = tiny_llada_dir if family == "llada" else tiny_dream_dir
    ids = some_ids(31, read_model_info(folder).vocab_size, seed=5)
    model, hidden = run(folder, [ids], dtype=torch.bfloat16)
    assert hidden.dtype == torch.bfloat16
    ref_hidden, _ = reference(folder, ids)
    cos = torch.nn.functional.cosine_similarity(hidden.double(), ref_hidden, dim=-1)
    assert cos.min() > 0.99


def test_rmsnorm_scales_after_casting_back():
    # Official order (both families): normalise in float32, cast to bf16, then multiply by weight.
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + torch.randn(64) / 3).bfloat16()
    x = (torch.randn(8, 64) * 3).bfloat16()
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(x), expected)


def test_rope_precision_llada_float32_dream_activation_dtype():
    x = torch.randn(50, 2, 128).bfloat16()
    cos, sin = rotary_cos_sin(torch.arange(1000, 1050), 128, 500000.0)
    half = lambda t: torch.cat((-t[..., 64:], t[..., :64]), -1)  # noqa: E731
    c, s = cos[:, None], sin[:, None]
    llada = (x.float() * c + half(x.float()) * s).bfloat16()        # rope_full_precision
    dream = x * c.bfloat16() + half(x) * s.bfloat16()                 # Qwen2: cos/sin cast first
    assert torch.equal(apply_rotary(x, cos, sin, full_precision=True), llada)
    assert torch.equal(apply_rotary(x, cos, sin, full_precision=False), dream)
    assert not torch.equal(llada, dream)   # the distinction is real at these positions


@pytest.mark.parametrize("override, message", [
    ({"block_type": "sequential"}, "block_type"),
    ({"alibi": True}, "alibi"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
])
def test_llada_refuses_options_it_does_not_implement(tmp_path, override, message):
    folder = write_tiny_llada(tmp_path)
    cfg = json.loads((folder / "config.json").read_text()) | override
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        read_model_info(folder)


@pytest.mark.parametrize("override, message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_dream_refuses_options_it_does_not_implement(tmp_path, override, message):
    folder = write_tiny_dream(tmp_path)
    cfg = json.loads((folder / "config.json").read_text()) | override
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        read_model_info(folder)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fused_elementwise_kernels_give_the_same_model(family, tiny_llada_dir, tiny_dream_dir, monkeypatch):
    """On CUDA the norms, RoPE and SwiGLU run fused Triton kernels; here they run in the Triton
    interpreter on the CPU tensors, and the whole model must match the torch path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (set by conftest when there is no GPU)")
    from model_executor.layers import fused_elementwise, mlp, rms_norm, rotary

    folder = tiny_llada_dir if family == "llada" else tiny_dream_dir
    rows = [some_ids(23, read_model_info(folder).vocab_size, seed=6), some_ids(9, read_model_info(folder).vocab_size, seed=7)]
    _, want = run(folder, rows)
    calls = []

    def fused(x):
        calls.append(x.shape)
        return fused_elementwise

    for module in (mlp, rms_norm, rotary):
        monkeypatch.setattr(module, "fused_kernels", fused)
    _, got = run(folder, rows)
    assert len(calls) == 5 * read_model_info(folder).attention_layout.num_layers + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
