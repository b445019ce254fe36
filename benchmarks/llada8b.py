"""An LLaDA-8B-shaped model folder for benchmarks: the real config.json values and a BPE tokenizer
trained on the long prompts in ../shared/data, with random weights (load_format="dummy")."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; a copy in .data/ (git-ignored) where shared/ does not travel
DATA = next((p for p in (_ROOT.parent / "shared" / "data" / "long_context_prompts.json",
                         _ROOT / ".data" / "long_context_prompts.json") if p.is_file()),
            _ROOT.parent / "shared" / "data" / "long_context_prompts.json")

LLADA_8B_CONFIG = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
    "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
    "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
    "pad_token_id": 126081, "include_bias": False, "weight_tying": False, "rope": True,
    "activation_type": "silu", "layer_norm_type": "rms", "torch_dtype": "bfloat16",
}


def long_text(data: Path = DATA) -> str:
    questions = json.loads(data.read_text())["questions"]
    return questions["64k"]


def write_model_dir(out: Path, data: Path = DATA) -> Path:
    """config.json + tokenizer files; the weights come from load_format="dummy"."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(LLADA_8B_CONFIG, indent=1))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|mdm_mask|>"])
    tok.train_from_iterator(long_text(data).splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>", "model_max_length": 1 << 20}))
    return out


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of the 64k prompt (repeated if it is shorter)."""
    ids = tokenizer.encode(long_text(), add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]
