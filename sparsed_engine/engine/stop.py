"""Where a stop string cuts the token ids: before the token in which it begins."""
from __future__ import annotations

from typing import Callable


def stop_string_cut(decode: Callable[[list[int]], str], ids: list[int], pos: int) -> int:
    """How many tokens to keep when the text `decode(ids)` is cut at character `pos`: those before
    the token whose text reaches past `pos` (the token the stop string begins in). The kept ids
    then decode to a prefix of the cut text, which may also hold that token's text before the
    stop string. Binary search: decoded length grows with the number of tokens."""
    lo, hi = 0, len(ids)   # the answer t is the least with len(decode(ids[:t + 1])) > pos
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid + 1])) > pos:
            hi = mid
        else:
            lo = mid + 1
    return lo
