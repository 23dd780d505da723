"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large
Language Models", arXiv 2402.17463; code github.com/HKUNLP/ChunkLlama).

The text is cut into chunks of stride = chunk_size - local_window tokens; keys are rotated at
their offset in their chunk, and a query at three positions: intra-chunk (keys in its own
chunk), successive-chunk (the previous chunk, true distances for the first local_window + 1
offsets) and inter-chunk (earlier chunks, a fixed position). Three parts merged by row
log-sum-exp; the map and the paper ↔ code correspondence are in rope/position_maps.py
(`dca_map`), the parts in rope/position_parts.py. Defaults (left out): ChunkLlama's
chunk_size = 3L/4 and local_window = L/8 for a model trained at L tokens. Every key's
rotated form depends on its own position only (j mod stride), so a KV cache keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..position_method import PartsMethod
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class DualChunkAttention(PartsMethod):
    name = "dca"
    chunk_size: int | None = None  # None: 3L/4
    local_window: int | None = None  # None: L/8
