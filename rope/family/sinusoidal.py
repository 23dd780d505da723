"""Sinusoidal absolute positions, added to the token embeddings (Vaswani et al. 2017):
PE(p, 2i) = sin(p·ω_i), PE(p, 2i+1) = cos(p·ω_i), ω_i = base^(-2i/d_model).

The frequency maps of the family apply to ω the same way they apply to θ, which is how
extrapolation is studied for models trained with it (in transformers: XGLM):
`get_method("sinusoidal", frequency_method=get_method("ntk", scale=2))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..method import Frequencies, Method, require
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class Sinusoidal(Method):
    name = "sinusoidal"
    base: float = 10000.0
    frequency_method: Method | None = None  # a frequency-only method applied to ω

    def validate(self) -> None:
        require(isinstance(self.base, (int, float)) and self.base > 1, "base", self.base, "must be a number > 1")
        inner = self.frequency_method
        if inner is not None:
            require(isinstance(inner, Method), "frequency_method", inner, "must be a ropelab method")
            require(inner.relative is None, "frequency_method", inner.spec(), "must be a frequency-only method")
            require(not isinstance(inner, Sinusoidal), "frequency_method", inner.spec(), "must not be sinusoidal")

    @property
    def uses_train_length(self) -> bool:  # type: ignore[override]
        return self.frequency_method is not None and self.frequency_method.needs_train_length

    @property
    def length_dependent(self) -> bool:  # type: ignore[override]
        return self.frequency_method is not None and self.frequency_method.length_dependent

    def frequencies(self, dim: int, base: float | None = None, seq_len: int | None = None) -> Frequencies:
        """ω' for an embedding width `dim`; `base` is ignored in favour of this method's own."""
        inner = self.frequency_method or Method()
        if self.train_length is not None:
            inner = inner.with_train_length(self.train_length)
        return inner.frequencies(dim, self.base, seq_len)
