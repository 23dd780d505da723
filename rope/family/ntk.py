"""NTK-aware scaling: base b·s^(d/(d-2)) (bloc97's post, 2023; YaRN paper eq. 16).
The exponent makes the lowest frequency exactly θ/s while the highest is kept."""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class NTK(Method):
    name = "ntk"
    scale: float

    def validate(self) -> None:
        check_scale("scale", self.scale)

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return Frequencies(fm.ntk_inv_freq(dim, base, self.scale), 1.0)
