"""Meshes, logical axis rules, and sequence parallelism."""

from longjax.parallel.layouts import LAYOUTS, from_layout, layout_order, shard_positions, to_layout
from longjax.parallel.ring_attention import ring_attention
from longjax.parallel.sequence_parallel import (
    STRATEGIES,
    all_gather_attention,
    sequence_parallel_attention,
)
from longjax.parallel.ulysses import ulysses_attention
from longjax.parallel.usp import usp_attention

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "all_gather_attention",
    "from_layout",
    "layout_order",
    "ring_attention",
    "sequence_parallel_attention",
    "shard_positions",
    "to_layout",
    "ulysses_attention",
    "usp_attention",
]
