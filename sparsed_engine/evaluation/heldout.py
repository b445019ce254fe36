"""Text the bundled model never trained on: the held-out files of the running interpreter's
standard library (examples/build_corpus.py trains on the others)."""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

MAX_FILE_CHARS = 300_000  # a few generated tables in the stdlib are huge and carry no language


def is_heldout(relpath: str) -> bool:
    """About 1 in 16 stdlib files, by a hash of the path that every Python version agrees on."""
    return zlib.crc32(relpath.encode()) % 16 == 0


def stdlib_files():
    """(path relative to the stdlib, text) of the standard library's own sources, tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/test" in f"/{rel}" or "idlelib/" in rel:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if 0 < len(text) <= MAX_FILE_CHARS:
            yield rel, text


def stdlib_documents() -> list[str]:
    return [text for rel, text in stdlib_files() if not is_heldout(rel)]


def heldout_documents(min_chars: int = 0) -> list[str]:
    """The held-out stdlib files of the running interpreter, at least `min_chars` long."""
    return [text for rel, text in stdlib_files() if is_heldout(rel) and len(text) >= min_chars]


def heldout_stream(tokenizer, max_chars: int = 1_000_000) -> list[int]:
    """Token ids of the held-out text (about 300k tokens: plenty of distinct 4k windows)."""
    text = "\n\n".join(heldout_documents(min_chars=2000))[:max_chars]
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)
