"""NTK-RoPE as Su first wrote it: base b·s (Su, Transformer升级之路 10, kexue.fm/archives/9675)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class NTKOld(Method):
    name = "ntk-old"
    scale: float

    def validate(self) -> None:
        check_scale("scale", self.scale)

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return Frequencies(fm.ntk_old_inv_freq(dim, base, self.scale), 1.0)
