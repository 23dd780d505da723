"""Dynamic NTK: NTK-aware scaling whose factor follows the current length,
s_eff = max(1, α·l/L - (α-1)) (emozilla, 2023, reddit r/LocalLLaMA "Dynamically Scaled
RoPE"; HF `dynamic`). While l ≤ L it is plain RoPE.

Two ways to read "the current length" l in a forward over many tokens:

- `per_query=False` (default, as transformers' `dynamic`): l is the length of the whole
  forward, cache included, so every row uses the frequencies of the last one. Length-
  dependent: a prefix's logits change when the sequence is extended, and with more than one
  layer a prefill differs from token-by-token decoding (a cache keeps earlier tokens'
  deeper-layer states from their own, shorter, lengths).
- `per_query=True`: the query at position p uses the frequencies for l = p + 1, and every
  key it attends to is rotated with those same frequencies. Row p of a prefill then
  computes exactly what decoding step p computes, in any number of layers, and a prefix's
  logits never change: prefix-consistent (`length_dependent` is False).

Either way the KV cache must hold keys before RoPE (YaRN paper §3.3), so the patch routes
attention through ropelab (`per_query_frequencies` asks for that in the per-query case).
`seq_len` is the current length; like transformers, it falls back to the training length
when not given.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_scale, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class DynamicNTK(Method):
    name = "dynamic-ntk"
    scale: float  # α
    per_query: bool = False  # False: one length per forward (HF `dynamic`); True: each query its own

    def validate(self) -> None:
        check_scale("scale", self.scale)
        require(isinstance(self.per_query, bool), "per_query", self.per_query, "must be True or False")

    @property
    def length_dependent(self) -> bool:
        return not self.per_query

    @property
    def per_query_frequencies(self) -> bool:
        return self.per_query

    @property
    def uses_train_length(self) -> bool:
        return True

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        length = self.required_train_length()
        current = length if seq_len is None else max(seq_len, length)
        return Frequencies(fm.dynamic_ntk_inv_freq(dim, base, self.scale, current, length), 1.0)
