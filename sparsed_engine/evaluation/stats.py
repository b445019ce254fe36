"""Intervals and paired tests for accuracies measured on the same prompts."""
from __future__ import annotations

import math


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test: the discordant pairs are Binomial(n, 1/2) when a and b are
    equally accurate on these prompts."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def within_points(dense: list[bool], other: list[bool], points: float = 1.0, alpha: float = 0.05) -> str:
    """"yes": `other` loses at most `points` percentage points to dense on these prompts; "no": it
    loses more and McNemar says the loss is real (p < alpha); "undecided": it loses more, but on
    too few prompts to tell from chance."""
    drop = 100 * (sum(dense) - sum(other)) / max(len(dense), 1)
    if drop <= points:
        return "yes"
    return "no" if mcnemar_p(dense, other) < alpha else "undecided"


def accuracy_cell(hits: list[bool]) -> str:
    """'93.0% [89.1, 95.6]': the accuracy and its 95% interval."""
    lo, hi = wilson(sum(hits), len(hits))
    return f"{100 * sum(hits) / max(len(hits), 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Normal 95% interval of a mean of per-sample scores in [0, 1] (clipped to [0, 1])."""
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5
    return max(0.0, m - z * sd / n ** 0.5), min(1.0, m + z * sd / n ** 0.5)
