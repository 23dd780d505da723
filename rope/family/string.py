"""STRING, shifted RoPE (An et al. 2024, "Why Does the Effective Context Length of LLMs Fall
Short?", arXiv 2410.18745; code github.com/HKUNLP/STRING).

Distances r < shift keep RoPE; farther keys are moved closer, r' = r - shift + local_window
(the query is rotated at i - shift + local_window, keys at their own positions), and cos
and sin of every part are multiplied by attention_factor (the authors' 0.1·ln 2 + 1). Two
distance bands merged by row log-sum-exp (rope/position_maps.py `string_map` states which
of the authors' two codes the key at r = shift follows). Defaults: shift = ⌊0.33·L⌋ and
local_window = 128 (the README's).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..method import Frequencies
from ..position_maps import STRING_ATTENTION_FACTOR
from ..position_method import PartsMethod
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class String(PartsMethod):
    name = "string"
    shift: int | None = None  # None: ⌊0.33·L⌋
    local_window: int | None = None  # None: min(128, shift)
    attention_factor: float = STRING_ATTENTION_FACTOR  # on cos and sin, every part

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        inner = self.borrowed_frequencies(dim, base, seq_len)
        return Frequencies(inner.inv_freq, inner.attention_factor * self.attention_factor)
