"""An LLaDA-8B-shaped model folder for benchmarks: the real config.json values and a BPE tokenizer
trained on generated text, with random weights (load_format="dummy"). With random weights the
prompt's content does not change the work, so the prompts are generated here too."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LLADA_8B_CONFIG = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
    "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
    "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
    "pad_token_id": 126081, "include_bias": False, "weight_tying": False, "rope": True,
    "activation_type": "silu", "layer_norm_type": "rms", "torch_dtype": "bfloat16",
}


def long_text(words: int = 60_000, seed: int = 0) -> str:
    """Deterministic English-like prose: sentences of pseudo-words drawn from a fixed syllable set."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "min", "ter", "sa", "ven", "du", "ri", "bel", "on", "ast", "em", "ur", "pi", "gor"]
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)]
    lexicon += ["the", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "was", "on"] * 60
    lines, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(lexicon))
        if len(sentence) > rng.randint(6, 24):
            lines.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ".", "?", ","]))
            sentence = []
    return "\n".join(" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5))


def write_model_dir(out: Path) -> Path:
    """config.json + tokenizer files; the weights come from load_format="dummy"."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(LLADA_8B_CONFIG, indent=1))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|mdm_mask|>"])
    tok.train_from_iterator(long_text().splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>", "model_max_length": 1 << 20}))
    return out


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of the generated text (repeated if it is shorter)."""
    ids = tokenizer.encode(long_text(), add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def kv_pool_bytes(model_dir: str, canvas: int, requests: int, itemsize: int, page: int = 64) -> int:
    """KV pool bytes (LLM(kv_cache_bytes=...)) holding `requests` canvases of `canvas` tokens in
    pages of `page` tokens (the engine's default page size), one spare page each, from an LLaDA
    config.json: K and V of every layer and KV head."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    per_token = 2 * cfg["n_layers"] * cfg["n_kv_heads"] * (cfg["d_model"] // cfg["n_heads"]) * itemsize
    return requests * (math.ceil(canvas / page) + 1) * page * per_token
