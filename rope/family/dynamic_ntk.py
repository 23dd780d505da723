"""Dynamic NTK: NTK-aware scaling whose factor follows the current length,
s_eff = max(1, α·l/L - (α-1)) (emozilla, 2023; HF `dynamic`).

Length-dependent: every position's encoding changes as the sequence grows, so a prefix's
logits change when the sequence is extended and a KV cache must hold keys before RoPE
(YaRN paper §3.3). `seq_len` is the number of positions in the current forward, cache
included; like transformers, it falls back to the training length when not given.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class DynamicNTK(Method):
    name = "dynamic-ntk"
    length_dependent = True
    uses_train_length = True
    scale: float  # α

    def validate(self) -> None:
        check_scale("scale", self.scale)

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        length = self.required_train_length()
        current = length if seq_len is None else max(seq_len, length)
        return Frequencies(fm.dynamic_ntk_inv_freq(dim, base, self.scale, current, length), 1.0)
