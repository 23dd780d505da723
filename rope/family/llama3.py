"""Llama 3.1 scaling: keep short wavelengths, divide long ones by s, blend in between
(Meta, Llama 3.1 reference code; HF `llama3`). Meta's defaults: factor 8, low 1, high 4,
original length 8192; here `train_length` comes from the model."""

from __future__ import annotations

from dataclasses import dataclass

from .. import frequencies as fm
from ..method import Frequencies, Method, check_number, check_scale, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Llama3(Method):
    name = "llama3"
    scale: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def validate(self) -> None:
        check_scale("scale", self.scale)
        check_number("low_freq_factor", self.low_freq_factor)
        check_number("high_freq_factor", self.high_freq_factor)
        require(self.low_freq_factor > 0, "low_freq_factor", self.low_freq_factor, "must be > 0")
        require(
            self.high_freq_factor > self.low_freq_factor,
            "high_freq_factor",
            self.high_freq_factor,
            f"must be > low_freq_factor={self.low_freq_factor}",
        )

    @property
    def uses_train_length(self) -> bool:
        return True

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        length = self.required_train_length()
        inv_freq = fm.llama3_inv_freq(dim, base, self.scale, length, self.low_freq_factor, self.high_freq_factor)
        return Frequencies(inv_freq, 1.0)
