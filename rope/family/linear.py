"""Position interpolation: θ'_i = θ_i / s (Chen et al. 2023, arXiv 2306.15595; HF `linear`)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Linear(Method):
    name = "linear"
    scale: float

    def validate(self) -> None:
        check_scale("scale", self.scale)

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return Frequencies(fm.linear_inv_freq(dim, base, self.scale), 1.0)
