"""Tiny LLaDA / Dream checkpoints in the real on-disk format, built offline in milliseconds.

Each writer produces what a HF model folder holds: config.json with the real key names,
float32 safetensors (one file, or two shards + index), a byte-level BPE tokenizer trained on
built-in text (so any string round-trips), tokenizer_config.json with the family's special
tokens and chat template. Weights are scaled so logits vary strongly across tokens and
positions: tests comparing implementations would pass trivially on near-uniform outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_TEXT = """\
The quick brown fox jumps over the lazy dog near the river bank.
A diffusion language model writes every token of the answer at once and refines it.
Each step predicts the masked positions and keeps the ones it is most sure about.
Sparse attention keeps only the important blocks of the attention map.
The engine packs several requests into one batch and runs them together.
What is the capital of France? The capital of France is Paris.
Write a short poem about the sea, the sky and the wind.
Two plus two is four, and three times three is nine.
She opened the window, and the cold morning air filled the room.
Please explain how a transformer layer works in simple words.
The scheduler decides which sequences run in the next step.
Hello world! This is a small test of the tokenizer and the model.
"""

# Real token strings of each family, appended after the trained vocabulary as real folders do.
_LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>"]
_DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]

_LLADA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_DREAM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _write_tokenizer(out: Path, specials: list[str], special_roles: dict, template: str,
                     max_len: int) -> dict[str, int]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines() * 20, trainer)
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
               "chat_template": template, "clean_up_tokenization_spaces": False, **special_roles},
              open(out / "tokenizer_config.json", "w"), indent=2)
    return {s: tok.token_to_id(s) for s in specials} | {"__size__": tok.get_vocab_size()}


def _save_weights(out: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(out / "model.safetensors.index.json", "w"), indent=2)


class _Init:
    """Seeded random tensors: linears ~ N(0, 1/fan_in) so activations keep unit scale,
    norm weights near (not exactly) 1 so a dropped or misplaced norm weight shows."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def linear(self, out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=self.g) * (gain / in_f ** 0.5)

    def norm(self, n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=self.g)

    def bias(self, n: int) -> torch.Tensor:
        return 0.2 * torch.randn(n, generator=self.g)

    def embed(self, rows: int, dim: int) -> torch.Tensor:
        return torch.randn(rows, dim, generator=self.g)


def write_tiny_llada(dir: str | Path, seed: int = 0, sharded: bool = False,
                     **config_overrides) -> Path:
    """A LLaDA (OLMo-style "llama" block) folder; overrides replace config.json keys
    (e.g. weight_tying=True, include_bias=True, n_kv_heads=2, embedding_size=...)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out, _LLADA_SPECIALS, {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>"}, _LLADA_TEMPLATE, 512)
    vocab = ids["__size__"]
    cfg = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "torch_dtype": "float32",
        "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 128,
        "mlp_ratio": 2, "vocab_size": vocab, "embedding_size": vocab, "rope": True,
        "rope_theta": 10000.0, "rope_full_precision": True, "rms_norm_eps": 1e-5,
        "layer_norm_type": "rms", "block_type": "llama", "activation_type": "silu",
        "max_sequence_length": 512, "include_bias": False, "include_qkv_bias": False,
        "weight_tying": False, "alibi": False, "attention_layer_norm": False,
        "input_emb_norm": False, "scale_logits": False, "clip_qkv": None,
        "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"], "use_cache": False,
    } | config_overrides
    json.dump(cfg, open(out / "config.json", "w"), indent=2)
    json.dump({"bos_token_id": ids["<|startoftext|>"], "eos_token_id": ids["<|endoftext|>"]},
              open(out / "generation_config.json", "w"), indent=2)

    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, mlp, emb = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]
    bias = cfg["include_bias"]
    qkv_bias = bias or cfg["include_qkv_bias"]
    norm_bias = bias if cfg.get("bias_for_layer_norm") is None else cfg["bias_for_layer_norm"]
    init = _Init(seed)
    p = "model.transformer."
    t = {p + "wte.weight": init.embed(emb, d)}

    def norm(prefix):
        t[prefix + ".weight"] = init.norm(d)
        if norm_bias:
            t[prefix + ".bias"] = init.bias(d)

    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        norm(b + "attn_norm")
        norm(b + "ff_norm")
        for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            t[b + name + ".weight"] = init.linear(rows, d, gain=2.0 if name != "v_proj" else 1.0)
            if qkv_bias:
                t[b + name + ".bias"] = init.bias(rows)
        t[b + "attn_out.weight"] = init.linear(d, d)
        t[b + "ff_proj.weight"] = init.linear(mlp, d)
        t[b + "up_proj.weight"] = init.linear(mlp, d)
        t[b + "ff_out.weight"] = init.linear(d, mlp)
        if bias:
            for name, n in (("attn_out", d), ("ff_proj", mlp), ("up_proj", mlp), ("ff_out", d)):
                t[b + name + ".bias"] = init.bias(n)
    norm(p + "ln_f")
    if not cfg["weight_tying"]:
        t[p + "ff_out.weight"] = init.linear(emb, d, gain=3.0)
        if bias:
            t[p + "ff_out.bias"] = init.bias(emb)
    _save_weights(out, t, sharded)
    return out


def write_tiny_dream(dir: str | Path, seed: int = 0, sharded: bool = False,
                     **config_overrides) -> Path:
    """A Dream (Qwen2-style, GQA, qkv bias) folder; overrides replace config.json keys
    (e.g. tie_word_embeddings=True)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out, _DREAM_SPECIALS, {
        "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>"}, _DREAM_TEMPLATE, 512)
    eos = ids["<|endoftext|>"]
    cfg = {
        "architectures": ["DreamModel"], "model_type": "Dream", "torch_dtype": "float32",
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "hidden_act": "silu",
        "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "vocab_size": ids["__size__"],
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
        "mask_token_id": ids["<|mask|>"], "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": eos, "use_cache": False,
    } | config_overrides
    json.dump(cfg, open(out / "config.json", "w"), indent=2)
    # Shaped like the real file (mask_token_id null there too); the chat turn ends with
    # <|im_end|>, so it is listed as a second EOS next to <|endoftext|>.
    json.dump({"bos_token_id": eos, "eos_token_id": [eos, ids["<|im_end|>"]], "pad_token_id": eos,
               "mask_token_id": None, "alg": "entropy", "alg_temp": 0.0, "eps": 1e-3,
               "temperature": 0.2, "top_p": 0.95, "steps": 512, "max_new_tokens": 512},
              open(out / "generation_config.json", "w"), indent=2)

    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, mlp, vocab = d // nh, cfg["intermediate_size"], cfg["vocab_size"]
    init = _Init(seed)
    t = {"model.embed_tokens.weight": init.embed(vocab, d)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        t[b + "input_layernorm.weight"] = init.norm(d)
        t[b + "post_attention_layernorm.weight"] = init.norm(d)
        for name, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            t[f"{b}self_attn.{name}.weight"] = init.linear(rows, d, gain=2.0 if name != "v_proj" else 1.0)
            t[f"{b}self_attn.{name}.bias"] = init.bias(rows)
        t[b + "self_attn.o_proj.weight"] = init.linear(d, nh * hd)
        t[b + "mlp.gate_proj.weight"] = init.linear(mlp, d)
        t[b + "mlp.up_proj.weight"] = init.linear(mlp, d)
        t[b + "mlp.down_proj.weight"] = init.linear(d, mlp)
    t["model.norm.weight"] = init.norm(d)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = init.linear(vocab, d, gain=3.0)
    _save_weights(out, t, sharded)
    return out
