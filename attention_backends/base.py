"""The interface every attention backend implements, and the plain data it receives."""
from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

# Per-row phases of one denoising step. A dense backend only ever sees "dense".
DENSE, SELECT, SPARSE = "dense", "select", "sparse"


@dataclass(frozen=True)
class AttentionLayout:
    """What a backend knows of the model: the attention shape held by this worker."""
    num_layers: int
    num_heads: int      # query heads on this worker
    num_kv_heads: int   # key/value heads on this worker
    head_dim: int
    scale: float        # the model's own softmax scale, 1/sqrt(head_dim)
    total_heads: int = 0  # query heads of the whole model (selection_scale="num_heads" uses it)
    # The softmax scale the family's sparse-attention reference selects with: "head_dim"
    # (1/sqrt(head_dim)) or "num_heads" (1/sqrt(total_heads)); SparseD's default follows it.
    selection_scale: str = "head_dim"

    def __post_init__(self):
        if self.total_heads == 0:
            object.__setattr__(self, "total_heads", self.num_heads)


@dataclass(frozen=True)
class RowSpec:
    """One canvas row of a packed batch, as the scheduler describes it for this step."""
    length: int                  # tokens in the row
    prompt_len: int              # tokens before the generation region
    phase: str = DENSE           # DENSE, SELECT (dense + choose the pattern) or SPARSE
    pattern_blocks: tuple[int, ...] = ()   # pool block ids holding this row's pattern
    config: Any = None           # the backend's resolved per-request config
    # Throughput mode (a KV cache refreshed per semi-AR block). kv_pages: the KV pool pages of
    # this row (page i holds canvas positions i*page_size ..); () = no cache. With pages and
    # computed=None the row is a refresh step: it runs whole, as in exact mode, and stores every
    # layer's K/V. computed=(s, e): a cached step: only canvas positions s..e-1 are in the packed
    # batch; their K/V are stored, then their queries attend to all `length` keys of the pool
    # (phase DENSE: every key; SPARSE: the stored pattern's rows of their query blocks).
    kv_pages: tuple[int, ...] = ()
    computed: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of this row in the step's packed batch."""
        return self.length if self.computed is None else self.computed[1] - self.computed[0]


@dataclass
class PoolSpec:
    """Size of the worker-side pattern pool; the scheduler's block manager hands out its ids."""
    num_blocks: int = 0
    block_bytes: int = 1 << 16


@dataclass
class KVPoolSpec:
    """Size of the worker-side paged KV pool (throughput mode); the block manager hands out pages."""
    num_pages: int = 0
    page_size: int = 64   # tokens per page


def kv_page_bytes(layout: AttentionLayout, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV page takes on a worker: K and V of `page_size` tokens in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layout.num_layers * page_size * layout.num_kv_heads * layout.head_dim * itemsize


class AttentionBackend(ABC):
    """A backend: a name, a per-step metadata builder and a per-layer forward.

    Class-level hooks let the scheduler side plan without touching tensors:
    `resolve_config` validates settings, `phase` says what a row does at a step,
    `pattern_blocks_needed` sizes a row's pattern in pool blocks.
    """
    name: ClassVar[str] = ""
    keeps_patterns: ClassVar[bool] = False  # True: the engine sizes a pattern pool for it
    supports_kv_cache: ClassVar[bool] = False  # True: its forward handles RowSpec.kv_pages / computed

    def __init__(self, layout: AttentionLayout, device: torch.device, dtype: torch.dtype):
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype

    # ---- scheduler-side planning (no tensors) ----
    @classmethod
    def resolve_config(cls, engine_config: dict | None, request_overrides: dict | None = None) -> Any:
        """Merge and validate settings; raise ValueError naming a bad key or value."""
        merged = dict(engine_config or {})
        merged.update(request_overrides or {})
        if merged:
            raise ValueError(f"attention backend {cls.name!r} takes no attention_config, got {sorted(merged)}")
        return None

    @classmethod
    def check_device(cls, config: Any, device: str) -> None:
        """Raise ValueError when resolved settings cannot run on `device` (e.g. a kernel it lacks)."""

    @classmethod
    def phase(cls, step: int, total_steps: int, config: Any) -> str:
        return DENSE

    @classmethod
    def pattern_blocks_needed(cls, layout: AttentionLayout, seq_len: int, config: Any,
                              block_bytes: int, total_steps: int) -> int:
        return 0

    # ---- worker-side ----
    @abstractmethod
    def build_metadata(self, rows: list[RowSpec]) -> Any:
        """Called once per step per batch; the result is passed to every layer's forward."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: Any,
                layer: int) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] packed rows; returns [T, Hq, D]."""

    def init_pool(self, spec: PoolSpec) -> None:
        """Allocate the pattern pool; backends that keep no pattern ignore it."""

    def pool_usage(self) -> dict:
        return {}

    def init_kv_pool(self, spec: KVPoolSpec) -> None:
        """Allocate the paged KV pool: k_cache / v_cache [num_layers, num_pages, page_size, Hkv, D]."""
        lay = self.layout
        shape = (lay.num_layers, spec.num_pages, spec.page_size, lay.num_kv_heads, lay.head_dim)
        self.kv_page_size = spec.page_size
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def kv_pool_usage(self) -> dict:
        k = getattr(self, "k_cache", None)
        return {"kv_allocated_bytes": 0 if k is None else 2 * k.numel() * k.element_size()}
