"""The two ablations SparseD's paper reports as failing, as attention backends for the engine.

Both subclass SparseDBackend and change one decision; they are registered through the same
entry-point group as every backend, from a throwaway dist-info that `register()` puts on sys.path,
so the engine loads them by name like a third-party package.
"""
from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import torch

from attention_backends.base import SELECT, SPARSE
from attention_backends.registry import GROUP
from attention_backends.sparsed import SparseDBackend


class SparseFromStep0Backend(SparseDBackend):
    """No dense warm-up: the pattern is chosen at step 0 (from that step's dense pass, when the
    whole generation region is still masked) and every later step is sparse. `skip` is ignored."""
    name = "sparsed_step0"

    @classmethod
    def phase(cls, step, total_steps, config):
        return SELECT if step == 0 else SPARSE


class SlidingWindowBackend(SparseDBackend):
    """A band around the diagonal at SparseD's density: each (head, query block) keeps as many
    key blocks as SparseD's own selection would, but the nearest ones (ties: the later block)."""
    name = "sparsed_window"

    def _choose(self, q, k, row, *args, **kwargs):
        counts = super()._choose(q, k, row, *args, **kwargs).sum(-1, keepdim=True)  # [H, nb, 1]
        idx = torch.arange(row.nb, device=counts.device)
        distance = (idx[None, :] - idx[:, None]).abs() * 2 + (idx[None, :] < idx[:, None])
        rank = distance.argsort(-1).argsort(-1)                       # rank of key j for query i
        return rank[None] < counts


BACKENDS = {cls.name: cls for cls in (SparseFromStep0Backend, SlidingWindowBackend)}


def register() -> None:
    """Make both backends discoverable by name for this process (idempotent)."""
    folder = Path(tempfile.gettempdir()) / "sparsed_fidelity_backends"
    info = folder / "sparsed_fidelity_backends-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsed-fidelity-backends\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(
        f"{name} = {__name__}:{cls.__name__}\n" for name, cls in BACKENDS.items()))
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
        importlib.invalidate_caches()
