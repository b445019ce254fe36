"""Build the tiny DLM's training corpus and tokenizer, offline, from text that installs locally.

Sources (each a list of documents):
  * Python's standard library sources (code and docstrings) of the running interpreter;
    files for which `is_heldout` is true are kept out and serve as held-out text
    (sparsed_engine/evaluation/heldout.py holds the split; the fidelity benchmarks read them);
  * the Python documentation sources (Debian `python3.X-doc`: html/_sources/*.rst.txt);
  * the fortune cookie collection (Debian `fortunes`) and the Debian Reference (Debian
    `debian-reference-en`);
  * the English text inside the gensim wheel's test data (news articles, and a shortened
    English Wikipedia dump with its markup stripped).

Output folder (default `.corpus/`, kept out of git by .git/info/exclude):
  tokenizer.json, tokenizer_config.json   byte-level BPE (digits split one by one, so numbers
                                          tokenize the same in any context) + LLaDA's specials
  tokens.npy                              uint16 token stream, documents shuffled by the seed,
                                          each followed by <|endoftext|>
  manifest.json                           per-source sizes, seed, vocabulary

    apt-get install -y python3.11-doc fortunes debian-reference-en
    python examples/build_corpus.py --out .corpus
"""
from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import html
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsed_engine.evaluation.heldout import stdlib_documents

GENSIM = "gensim==4.4.0"
VOCAB_SIZE = 4096
# LLaDA's own special tokens, appended after the trained vocabulary as in the real tokenizer.
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|mdm_mask|>"]
CHAT_TEMPLATE = (  # LLaDA-8B-Instruct's template
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
def python_doc_documents() -> list[str]:
    # several /usr/share/doc/python3* names link to one folder: read each real file once
    found = glob.glob("/usr/share/doc/python3*/html/_sources/**/*.txt", recursive=True)
    files = sorted({os.path.realpath(f) for f in found})
    if not files:
        sys.exit("no Python documentation sources: apt-get install -y python3.11-doc (or python3-doc)")
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


def fortune_documents() -> list[str]:
    files = [f for f in sorted(glob.glob("/usr/share/games/fortunes/*")) if Path(f).suffix == ""]
    if not files:
        sys.exit("no fortune files: apt-get install -y fortunes")
    docs = []
    for f in files:
        cookies = re.split(r"\n%\n", Path(f).read_text(encoding="utf-8", errors="replace"))
        # one document per ~20 cookies: single cookies are too short to teach any context
        docs += ["\n\n".join(cookies[i:i + 20]) for i in range(0, len(cookies), 20)]
    return docs


def debian_reference_documents() -> list[str]:
    path = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
    if not path.is_file():
        sys.exit("no Debian Reference: apt-get install -y debian-reference-en")
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    return [c for c in re.split(r"\n(?=Chapter\s\d+\.)", text) if c.strip()]


def _strip_wikitext(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", "", text, flags=re.S)
    for _ in range(3):  # templates nest
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*(?:\[\[[^\]]*\]\][^\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)
    text = re.sub(r"'{2,}|<[^>]+>", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def gensim_documents(cache: Path) -> list[str]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("gensim-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(cache), GENSIM], check=True)
        wheels = sorted(cache.glob("gensim-*.whl"))
    data = "gensim/test/test_data/"
    with zipfile.ZipFile(wheels[-1]) as z:
        news = [line for name in ("lee_background.cor", "lee.cor")
                for line in z.read(data + name).decode("latin-1").splitlines() if line.strip()]
        dump = bz2.decompress(z.read(data + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
    articles = re.findall(r"<text[^>]*>(.*?)</text>", dump.decode("utf-8"), flags=re.S)
    wiki = [t for t in map(_strip_wikitext, articles) if len(t) > 500]
    return news + wiki


def train_tokenizer(docs: list[str], out: Path, max_len: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mdm_mask|>", "additional_special_tokens": ["<|eot_id|>"],
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".corpus")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "sparsed_engine_corpus"),
                    help="where the gensim wheel is downloaded (kept out of --out, which travels to the GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=4096, help="model_max_length of the tokenizer")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = {"python_stdlib": stdlib_documents(), "python_docs": python_doc_documents(),
               "fortunes": fortune_documents(), "debian_reference": debian_reference_documents(),
               "gensim_text": gensim_documents(Path(args.cache))}
    docs = [d for group in sources.values() for d in group]
    random.Random(args.seed).shuffle(docs)
    tok = train_tokenizer(docs, out, args.max_len)
    eos = tok.token_to_id("<|endoftext|>")
    ids = [i for enc in tok.encode_batch(docs) for i in enc.ids + [eos]]
    np.save(out / "tokens.npy", np.asarray(ids, dtype=np.uint16))
    manifest = {"seed": args.seed, "vocab_size": VOCAB_SIZE, "tokens": len(ids),
                "python": sys.version.split()[0],
                "sources": {k: {"documents": len(v), "chars": sum(map(len, v))} for k, v in sources.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
