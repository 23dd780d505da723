"""β-base (NTK-RoPE-mixed): θ'_i = θ_i·exp(-a·(i+1)^β) with a·(d/2)^β = ln s
(Su, Transformer升级之路 11, kexue.fm/archives/9706; bojone/rerope's LLaMA patch).

β = 0 is position interpolation (every pair scaled by 1/s); β = 1 is Su's NTK-RoPE-fixed in
this indexing, θ_i·s^(-2(i+1)/d). Both ends scale the last pair by exactly 1/s. Note that
β = 1 is *not* the same as `ntk` (bloc97): that one keeps pair 0 unscaled, this one scales
it by s^(-2/d). Su's blog default is β = 0.625; his LLaMA-2 patch uses s = 12, β = 0.75.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_number, check_scale, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class BetaBase(Method):
    name = "beta-base"
    scale: float
    beta: float = 0.625

    def validate(self) -> None:
        check_scale("scale", self.scale)
        check_number("beta", self.beta)
        require(0 <= self.beta <= 1, "beta", self.beta, "must be in [0, 1]")

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return Frequencies(fm.beta_base_inv_freq(dim, base, self.scale, self.beta), 1.0)
