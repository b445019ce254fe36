"""Ulysses sequence parallelism: tokens sharded across ranks, heads sharded for attention."""
from model_executor.parallel.group import DistributedInit, SequenceParallelGroup
from model_executor.parallel.layout import TokenShard, kv_repeats, rank_layout
from model_executor.parallel.ulysses import UlyssesBackend

__all__ = ["DistributedInit", "SequenceParallelGroup", "TokenShard", "UlyssesBackend", "kv_repeats",
           "rank_layout"]
