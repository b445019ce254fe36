"""The two ablations SparseD's paper reports as failing, a probe that measures the pattern and
SparseD with drawn per-head densities (drawn.py), as attention backends for the engine.

Each subclasses SparseDBackend and changes one decision or adds a measurement; they are registered
through the same entry-point group as every backend, from a throwaway dist-info that `register()`
puts on sys.path, so the engine loads them by name like a third-party package.
"""
from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import torch

from attention_backends.base import SELECT, SPARSE
from attention_backends.registry import GROUP
from attention_backends import sparse_ops
from attention_backends.sparsed import SparseDBackend
from sparsed_engine.evaluation.drawn import DrawnDensityBackend


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


class PatternProbeBackend(SparseDBackend):
    """SparseD unchanged, plus two measurements at every sparse step, per row and layer, appended
    to `records`: `mass`, the share of the dense attention probability (the model's own softmax
    over all keys, summed per tile) that falls inside the kept tiles, averaged over heads and query
    blocks; `jaccard`, |stored & now| / |stored | now| between the stored pattern and the one the
    selection would choose on this step's q/k (the pattern's drift since the selection step)."""
    name = "sparsed_probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    def _sparse(self, q, k, v, g, layer, out):
        super()._sparse(q, k, v, g, layer, out)
        for row in g.rows:
            s, e = row.start, row.start + row.length
            kept = self.load_tiles(row, layer)
            dense, _ = sparse_ops.importance(q[s:e], k[s:e], self.layout.scale, row.config.block_size,
                                             row.gen_block, row.config.kernel)
            mass = ((dense * kept).sum(-1) / dense.sum(-1).clamp_min(1e-30)).mean().item()
            now = self._choose(q[s:e], k[s:e], row)
            jaccard = ((now & kept).sum() / (now | kept).sum().clamp_min(1)).item()
            self.records.append({"layer": layer, "mass": mass, "jaccard": jaccard})


BACKENDS = {cls.name: cls for cls in (SparseFromStep0Backend, SlidingWindowBackend, PatternProbeBackend,
                                      DrawnDensityBackend)}


def register() -> None:
    """Make these backends discoverable by name for this process (idempotent)."""
    folder = Path(tempfile.gettempdir()) / "sparsed_engine_evaluation_backends"
    info = folder / "sparsed_engine_evaluation_backends-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsed-engine-evaluation-backends\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(
        f"{name} = {cls.__module__}:{cls.__name__}\n" for name, cls in BACKENDS.items()))
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
        importlib.invalidate_caches()
