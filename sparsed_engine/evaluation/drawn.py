"""Kept-tile patterns with a prescribed density per (layer, head), for timing sparse steps at the
density a fidelity model measured (random weights have no real sparsity to select from).

`draw_head_densities` maps a measured [layers][heads] table onto another model's shape (a
balanced resample in depth order);
`DrawnDensityBackend` is SparseD with one decision changed: at the selection step each (layer, head)
keeps a fixed number of key blocks in every query block, round(density * nb) (at least 1), the
diagonal block first and the rest in order of SparseD's own block importance (over all keys: the
density is prescribed per head, so prompt and generation keys are not chosen separately) on this
step's q/k. Everything else (the pool, the stored bits, the sparse kernels) is SparseD's. Without
`head_density` it is exactly SparseD. Registered for the engine by ablations.register().
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from attention_backends import sparse_ops
from attention_backends.sparsed import SparseDBackend, SparseDConfig


def draw_head_densities(source: list[list[float]], layers: int, heads: int, seed: int = 0) -> list[list[float]]:
    """A [layers][heads] table drawn from the measured [L][H] table `source`: a balanced resample.

    Every measured (layer, head) density is copied equally often (the counts differ by at most one
    when layers * heads is not a multiple of L * H; the extra copies go to heads chosen at random),
    the copies of each source layer are shuffled among themselves, and the source layers, in depth
    order, fill the target's layers in depth order. So the drawn distribution matches the measured
    one (not only its mean), and a target layer at a given relative depth holds the densities of
    the source layer(s) at that depth."""
    if not source or not all(isinstance(r, (list, tuple)) and r for r in source):
        raise ValueError(f"source density table must be a non-empty [layers][heads] list, got {source!r:.80}")
    if len({len(r) for r in source}) != 1:
        raise ValueError(f"source density table rows differ in length: {[len(r) for r in source]}")
    bad = [d for r in source for d in r if isinstance(d, bool) or not (isinstance(d, (int, float)) and 0 < d <= 1)]
    if bad:
        raise ValueError(f"source densities must lie in (0, 1], got {bad[:4]}")
    if layers < 1 or heads < 1:
        raise ValueError(f"target shape must be positive, got layers={layers} heads={heads}")
    g = torch.Generator().manual_seed(seed)
    flat = [float(d) for row in source for d in row]
    slots, width = layers * heads, len(source[0])
    base, extra = divmod(slots, len(flat))
    lucky = set(torch.randperm(len(flat), generator=g)[:extra].tolist())
    copies = [base + (i in lucky) for i in range(len(flat))]
    filled: list[float] = []
    for s in range(len(source)):
        chunk = [flat[i] for i in range(s * width, (s + 1) * width) for _ in range(copies[i])]
        filled += [chunk[j] for j in torch.randperm(len(chunk), generator=g).tolist()]
    return [filled[l * heads:(l + 1) * heads] for l in range(layers)]


def kept_counts(head_density: torch.Tensor, nb: int) -> torch.Tensor:
    """Key blocks kept per query block for each head's density: round(d * nb), in [1, nb]."""
    return (head_density * nb).round().clamp(1, nb).long()


@dataclass(frozen=True)
class DrawnConfig(SparseDConfig):
    # [layers][heads] kept-tile density per head (None: SparseD's own selection)
    head_density: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.head_density is None:
            return
        rows = self.head_density
        if not rows or len({len(r) for r in rows}) != 1 or not all(0 < d <= 1 for r in rows for d in r):
            raise ValueError(f"attention_config['head_density'] must be a [layers][heads] table of "
                             f"densities in (0, 1], got {rows!r:.120}")


class DrawnDensityBackend(SparseDBackend):
    """SparseD whose selection keeps each head's prescribed density (module doc). `achieved`
    holds, per layer, each head's kept-tile share [H] of the last pattern chosen."""
    name = "sparsed_drawn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.achieved: dict[int, torch.Tensor] = {}
        self._layer = 0

    @classmethod
    def resolve_config(cls, engine_config, request_overrides=None) -> DrawnConfig:
        merged = {**(engine_config or {}), **(request_overrides or {})}
        table = merged.pop("head_density", None)
        base = super().resolve_config(merged)
        if table is not None:
            try:
                table = tuple(tuple(float(d) for d in row) for row in table)
            except (TypeError, ValueError):
                raise ValueError(f"attention_config['head_density'] must be a [layers][heads] table "
                                 f"of numbers, got {table!r:.120}") from None
        return DrawnConfig(**asdict(base), head_density=table)

    def forward(self, q, k, v, metadata, layer):
        self._layer = layer   # the selection below needs the layer; SparseD's _choose is not told it
        return super().forward(q, k, v, metadata, layer)

    def _choose(self, q, k, row, lse=None):
        cfg = row.config
        if cfg.head_density is None:
            keep = super()._choose(q, k, row, lse)
        else:
            lay = self.layout
            shape = (len(cfg.head_density), len(cfg.head_density[0]))
            if shape != (lay.num_layers, lay.num_heads):
                raise ValueError(f"attention_config['head_density'] is {shape[0]} layers x {shape[1]} heads; "
                                 f"this worker holds {lay.num_layers} x {lay.num_heads}")
            scale = (lay.scale if self.selection_scale(cfg) == "head_dim" else 1.0 / math.sqrt(lay.total_heads))
            imp, _ = sparse_ops.importance(q, k, scale, cfg.block_size, row.gen_block, cfg.kernel, lse)
            imp = imp.float()
            diag = torch.arange(row.nb, device=imp.device)
            imp[:, diag, diag] = float("inf")                          # the diagonal block always
            count = kept_counts(torch.tensor(cfg.head_density[self._layer], device=imp.device), row.nb)
            order = imp.argsort(dim=-1, descending=True)
            ranked = torch.arange(row.nb, device=imp.device) < count[:, None, None]   # [H, 1, nb]
            keep = torch.zeros(imp.shape, dtype=torch.bool, device=imp.device).scatter_(
                -1, order, ranked.expand_as(order))
        self.achieved[self._layer] = keep.flatten(1).float().mean(1)   # left on the device: no sync
        return keep
