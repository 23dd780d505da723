"""YaRN: NTK-by-parts interpolation plus an attention factor (Peng et al. 2023,
arXiv 2309.00071; HF `yarn`).

The ramp is linear in the pair index, as in the yarn repository and transformers, not in
wavelength as the paper writes it: that is what users compare against. The attention
factor (default 0.1·ln s + 1) multiplies cos and sin, so logits scale by its square.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_number, check_positive, check_scale, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class YaRN(Method):
    name = "yarn"
    scale: float
    beta_fast: float = 32.0  # rotations per training length above which a pair is kept
    beta_slow: float = 1.0  # ... below which it is interpolated by 1/s
    attention_factor: float | None = None  # None: 0.1·ln s + 1

    def validate(self) -> None:
        check_scale("scale", self.scale)
        check_number("beta_fast", self.beta_fast)
        check_number("beta_slow", self.beta_slow)
        require(self.beta_slow > 0, "beta_slow", self.beta_slow, "must be > 0")
        require(self.beta_fast > self.beta_slow, "beta_fast", self.beta_fast, f"must be > beta_slow={self.beta_slow}")
        if self.attention_factor is not None:
            check_positive("attention_factor", self.attention_factor)

    @property
    def uses_train_length(self) -> bool:
        return True

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        inv_freq = fm.yarn_inv_freq(dim, base, self.scale, self.required_train_length(), self.beta_fast, self.beta_slow)
        factor = self.attention_factor
        return Frequencies(inv_freq, fm.yarn_default_attention_factor(self.scale) if factor is None else float(factor))
