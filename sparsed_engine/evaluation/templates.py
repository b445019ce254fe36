"""The retrieval templates the models are trained on (examples/train_tiny_dlm.py,
examples/train_long_dlm.py) and evaluated with (fidelity, the RULER-style suite)."""
from __future__ import annotations

import random

PASSKEY_NEEDLE = " The pass key is {key}. Remember it."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
KV_NEEDLE = " The secret number of {name} is {key}."
KV_QUESTION = "\nWhat is the secret number of {name}? The secret number of {name} is"
ANSWER = " {key}."
KV_NAMES = ("apple", "river", "copper", "falcon", "violet", "harbor", "maple", "comet", "granite",
            "lantern", "meadow", "orchid", "pepper", "saddle", "thunder", "walnut", "zephyr", "cobalt")


def passkey(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))
