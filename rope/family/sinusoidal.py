"""Sinusoidal absolute positions, added to the token embeddings (Vaswani et al. 2017):
PE(p, 2i) = sin(p·ω_i), PE(p, 2i+1) = cos(p·ω_i), ω_i = base^(-2i/d_model).

The frequency maps of the family apply to ω the same way they apply to θ, which is how
extrapolation is studied for models trained with it (in transformers: XGLM):
`get_method("sinusoidal", frequency_method=get_method("ntk", scale=2))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..method import BorrowedFrequencies, Frequencies, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Sinusoidal(BorrowedFrequencies):
    name = "sinusoidal"
    base: float = 10000.0

    def validate(self) -> None:
        require(isinstance(self.base, (int, float)) and self.base > 1, "base", self.base, "must be a number > 1")
        super().validate()

    def frequencies(self, dim: int, base: float | None = None, seq_len: int | None = None) -> Frequencies:
        """ω' for an embedding width `dim`; `base` is ignored in favour of this method's own."""
        return self.borrowed_frequencies(dim, self.base, seq_len)
