"""StreamingLLM's attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models
with Attention Sinks", arXiv 2309.17453; code github.com/mit-han-lab/streaming-llm).

For perplexity the authors feed one token at a time and keep the first `sinks` and the last
`window` cache entries, with positions given by the slot in the cache; query i therefore
sees the window + 1 latest keys at their true distances and the sink tokens at distance
min(i, sinks + window) - j (rope/position_maps.py `sinks_map`). Computed as a distance band
plus a key-prefix part merged by row log-sum-exp, with no mask materialised; cached
decoding equals prefill. Defaults: 4 sinks and a window of min(2000, L - 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..position_method import PartsMethod
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Sinks(PartsMethod):
    name = "sinks"
    sinks: int = 4
    window: int | None = None  # None: min(2000, L - 4)
