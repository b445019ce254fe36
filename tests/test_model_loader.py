"""Model folder -> info, tokenizer, weights: what is read, and a clear error for each bad folder."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention_backends.base import RowSpec
from attention_backends.dense import DenseBackend
from model_executor import (DreamModel, LLaDAModelLM, load_model, load_tokenizer, read_model_info,
                            resolve_model_class)
from tests.tiny_checkpoints import write_tiny_dream, write_tiny_llada


def load(folder, dtype=torch.float32, load_format="auto"):
    info = read_model_info(folder)
    return load_model(info, DenseBackend(info.attention_layout, "cpu", dtype), dtype, "cpu", load_format)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# ---- what read_model_info reports ----

def test_llada_info(tiny_llada_dir):
    info = read_model_info(tiny_llada_dir)
    tok = load_tokenizer(tiny_llada_dir)
    assert info.model_class is LLaDAModelLM and info.family == "llada"
    assert info.mask_token_id == tok.convert_tokens_to_ids("<|mdm_mask|>") == tok.mask_token_id
    assert info.eos_token_ids == (tok.convert_tokens_to_ids("<|endoftext|>"),)
    assert info.vocab_size == len(tok) and info.max_model_len == 512 and info.torch_dtype == "float32"
    assert (info.attention_layout.num_heads, info.attention_layout.head_dim) == (4, 16)


def test_dream_info_merges_eos_from_generation_config(tiny_dream_dir):
    info = read_model_info(tiny_dream_dir)
    tok = load_tokenizer(tiny_dream_dir)
    assert info.model_class is DreamModel and info.family == "dream"
    assert info.mask_token_id == tok.convert_tokens_to_ids("<|mask|>")   # generation_config has null
    assert info.eos_token_ids == tuple(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    assert info.generation_config["alg"] == "entropy"
    assert (info.attention_layout.num_heads, info.attention_layout.num_kv_heads) == (4, 2)


def test_registry_falls_back_to_model_type_and_names_the_supported():
    assert resolve_model_class({"model_type": "Dream"}) is DreamModel
    assert resolve_model_class({"architectures": ["Other", "LLaDAModelLM"]}) is LLaDAModelLM
    with pytest.raises(ValueError, match="unsupported architecture.*'GPT2LMHeadModel'.*supported.*DreamModel"):
        resolve_model_class({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


# ---- tokenizer ----

@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tokenizer_round_trips_and_has_chat_template(family, tiny_llada_dir, tiny_dream_dir):
    tok = load_tokenizer(tiny_llada_dir if family == "llada" else tiny_dream_dir)
    text = "What is the capital of Spain? Zebras run 42 km!"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in prompt and "assistant" in prompt


def test_tokenizer_falls_back_when_the_class_needs_remote_code(tmp_path, tiny_dream_dir):
    folder = copy_of(tiny_dream_dir, tmp_path)
    # What a real Dream folder says: a remote-code class this process may not import.
    edit_json(folder / "tokenizer_config.json", tokenizer_class="DreamTokenizer",
              auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    tok = load_tokenizer(folder)
    reference = load_tokenizer(tiny_dream_dir)
    assert tok.mask_token == "<|mask|>" and tok.eos_token == "<|endoftext|>"
    assert tok("hello world")["input_ids"] == reference("hello world")["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# ---- loading weights ----

def test_single_and_sharded_checkpoints_load_equal(tmp_path):
    single = load(write_tiny_llada(tmp_path / "single", seed=7))
    sharded_dir = write_tiny_llada(tmp_path / "sharded", seed=7, sharded=True)
    assert not (sharded_dir / "model.safetensors").exists()
    sharded = load(sharded_dir)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loaded_model_is_in_dtype_eval_and_gradient_free(tiny_dream_dir):
    model = load(tiny_dream_dir, dtype=torch.bfloat16)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    stored = load_file(str(tiny_dream_dir / "model.safetensors"))["model.norm.weight"]
    assert torch.equal(model.model.norm.weight, stored.bfloat16())


def test_dummy_load_needs_only_config(tmp_path, tiny_dream_dir):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(tiny_dream_dir / "config.json", folder)
    first, second = load(folder, load_format="dummy"), load(folder, load_format="dummy")
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))  # seeded
    assert torch.equal(first.model.norm.weight, torch.ones(64))
    assert 0.015 < first.lm_head.weight.std() < 0.025
    info = read_model_info(folder)
    meta = DenseBackend(info.attention_layout, "cpu", torch.float32).build_metadata([RowSpec(10, 5)])
    hidden = first(torch.arange(10), torch.arange(10), meta)
    assert torch.isfinite(first.compute_logits(hidden, torch.arange(1, 10))).all()


def test_unknown_load_format(tiny_llada_dir):
    with pytest.raises(ValueError, match="load_format 'pt'"):
        load(tiny_llada_dir, load_format="pt")


# ---- errors that name the problem ----

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_model_info(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_model_info(tmp_path)


def test_config_not_json(tmp_path, tiny_llada_dir):
    folder = copy_of(tiny_llada_dir, tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_model_info(folder)


def test_unsupported_architecture(tmp_path, tiny_llada_dir):
    folder = copy_of(tiny_llada_dir, tmp_path)
    edit_json(folder / "config.json", architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="config.json.*unsupported architecture.*MistralForCausalLM"):
        read_model_info(folder)


def test_mask_token_id_absent(tmp_path, tiny_dream_dir):
    folder = copy_of(tiny_dream_dir, tmp_path)
    edit_json(folder / "config.json", mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id is absent"):
        read_model_info(folder)


def test_llada_default_mask_id_must_fit_the_vocabulary(tmp_path, tiny_llada_dir):
    folder = copy_of(tiny_llada_dir, tmp_path)
    edit_json(folder / "config.json", mask_token_id=None)   # falls back to the official 126336
    with pytest.raises(ValueError, match="mask_token_id=126336 is outside"):
        read_model_info(folder)


def _rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "unexpected tensors.*extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.ones(63)}), r"wrong shapes.*model.norm.weight: checkpoint \(63,\), model \(64,\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_checkpoint_names_and_shapes_are_strict(tmp_path, tiny_dream_dir, change, message):
    folder = copy_of(tiny_dream_dir, tmp_path)
    _rewrite_weights(folder, change)
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_tied_llada_refuses_a_stray_head(tmp_path, tiny_llada_dir):
    folder = copy_of(tiny_llada_dir, tmp_path)
    edit_json(folder / "config.json", weight_tying=True)
    with pytest.raises(ValueError, match="unexpected tensors.*model.transformer.ff_out.weight"):
        load(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path, tiny_llada_dir, damage):
    folder = copy_of(tiny_llada_dir, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x00garbage" * 100)
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        load(folder)


def test_missing_shard(tmp_path):
    folder = write_tiny_dream(tmp_path / "m", sharded=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(folder)


def test_no_weights(tmp_path, tiny_llada_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llada_dir / "config.json", folder)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load(folder)


# ---- real checkpoints' config.json (LLaDA-8B-Instruct, Dream-v0-Instruct-7B) ----

REAL_LLADA = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "bfloat16", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}
REAL_DREAM = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 152064,
}


def _llada_checkpoint_shapes():
    p, shapes = "model.transformer.", {}
    for i in range(32):
        b = f"{p}blocks.{i}."
        shapes |= {b + "attn_norm.weight": (4096,), b + "ff_norm.weight": (4096,),
                   b + "q_proj.weight": (4096, 4096), b + "k_proj.weight": (4096, 4096),
                   b + "v_proj.weight": (4096, 4096), b + "attn_out.weight": (4096, 4096),
                   b + "ff_proj.weight": (12288, 4096), b + "up_proj.weight": (12288, 4096),
                   b + "ff_out.weight": (4096, 12288)}
    return shapes | {p + "wte.weight": (126464, 4096), p + "ln_f.weight": (4096,), p + "ff_out.weight": (126464, 4096)}


def _dream_checkpoint_shapes():
    shapes = {}
    for i in range(28):
        b = f"model.layers.{i}."
        shapes |= {b + "input_layernorm.weight": (3584,), b + "post_attention_layernorm.weight": (3584,),
                   b + "self_attn.q_proj.weight": (3584, 3584), b + "self_attn.q_proj.bias": (3584,),
                   b + "self_attn.k_proj.weight": (512, 3584), b + "self_attn.k_proj.bias": (512,),
                   b + "self_attn.v_proj.weight": (512, 3584), b + "self_attn.v_proj.bias": (512,),
                   b + "self_attn.o_proj.weight": (3584, 3584), b + "mlp.gate_proj.weight": (18944, 3584),
                   b + "mlp.up_proj.weight": (18944, 3584), b + "mlp.down_proj.weight": (3584, 18944)}
    return shapes | {"model.embed_tokens.weight": (152064, 3584), "model.norm.weight": (3584,),
                     "lm_head.weight": (152064, 3584)}


@pytest.mark.parametrize("config, shapes, expected", [
    (REAL_LLADA, _llada_checkpoint_shapes, ("llada", 126336, (126081,), 4096, (32, 32, 32, 128))),
    (REAL_DREAM, _dream_checkpoint_shapes, ("dream", 151666, (151643,), 131072, (28, 28, 4, 128))),
], ids=["llada-8b", "dream-7b"])
def test_real_configs_build_the_real_parameter_set(tmp_path, config, shapes, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = read_model_info(tmp_path)
    lay = info.attention_layout
    assert (info.family, info.mask_token_id, info.eos_token_ids, info.max_model_len,
            (lay.num_layers, lay.num_heads, lay.num_kv_heads, lay.head_dim)) == expected
    assert info.torch_dtype == "bfloat16" and lay.scale == 1 / math.sqrt(128)
    with torch.device("meta"):   # full size, no memory
        model = info.model_class(info.config, DenseBackend(lay, "cpu", torch.bfloat16))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes()
