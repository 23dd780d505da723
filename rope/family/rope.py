"""Plain rotary position embedding (Su et al. 2021, RoFormer, arXiv 2104.09864)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Rope(Method):
    name = "rope"
    base: float | None = None  # overrides the model's rope_theta when set

    def validate(self) -> None:
        if self.base is not None:
            require(isinstance(self.base, (int, float)) and self.base > 1, "base", self.base, "must be a number > 1")

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return Frequencies(fm.rope_inv_freq(dim, self.base or base), 1.0)
