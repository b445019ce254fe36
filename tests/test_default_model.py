"""The bundled default model: the loader reads it as a real LLaDA folder, and LLM() / the CLI use it."""
import json

import torch

from attention_backends.dense import DenseBackend
from model_executor.model_loader import load_model, load_tokenizer, read_model_info
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.entrypoints.cli import main
from sparsed_engine.llm import DEFAULT_MODEL


def test_bundled_folder_is_a_small_llada_checkpoint():
    info = read_model_info(DEFAULT_MODEL)
    tok = load_tokenizer(DEFAULT_MODEL)
    assert info.family == "llada" and info.torch_dtype == "bfloat16" and info.max_model_len >= 2048
    assert info.mask_token_id == tok.convert_tokens_to_ids("<|mdm_mask|>")
    assert tok.convert_tokens_to_ids("<|endoftext|>") in info.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    index = json.loads((DEFAULT_MODEL / "model.safetensors.index.json").read_text())
    shards = {DEFAULT_MODEL / f for f in index["weight_map"].values()}
    assert all(s.stat().st_size <= 16e6 for s in shards)            # shards of at most 16 MB
    assert sum(s.stat().st_size for s in shards) <= 25e6              # a small model: 25 MB at most
    model = load_model(info, DenseBackend(info.attention_layout, "cpu", torch.float32), torch.float32, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_llm_without_model_uses_it_and_greedy_is_deterministic():
    llm = LLM()
    params = SamplingParams(max_tokens=16, steps=16, block_length=8)
    first = llm.generate("The history of", params, use_tqdm=False)[0].outputs[0]
    again = llm.generate("The history of", params, use_tqdm=False)[0].outputs[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert llm.llm_engine.info.path == DEFAULT_MODEL


def test_cli_without_model_flag(capsys):
    assert main(["generate", "--prompt", "The history of", "--max-tokens", "8", "--no-progress"]) == 0
    assert "=== request 0" in capsys.readouterr().out


def test_bundled_model_is_trained_it_retrieves_passkeys():
    """A collapsed or untrained checkpoint retrieves nothing; the shipped one finds a 5-digit key
    hidden in ~500 tokens of held-out text (the fidelity benchmark's prompts, greedy)."""
    from sparsed_engine.evaluation.fidelity import passkey_prompts
    from sparsed_engine.evaluation.heldout import heldout_stream
    from sparsed_engine.evaluation.measures import passkey_accuracy

    llm = LLM()
    prompts = passkey_prompts(llm.get_tokenizer(), heldout_stream(llm.get_tokenizer(), 200_000), 512, 4, 8, seed=5)
    assert passkey_accuracy(llm, prompts, 8) >= 0.75
