"""Leaky ReRoPE: r' = r for r < w, else w + (r - w)/k (Su, Transformer升级之路 12 and 13;
bojone/rerope). k = 1 is plain RoPE and k → ∞ tends to ReRoPE.

Far part: with frequencies θ/k, the query is rotated at i + w(k-1) and the key at j, so the
angle is ((i - j) + w(k-1))·θ/k = (w + (r - w)/k)·θ. Su's rule for k: w + (N-1-w)/k ≤ L/2
for a test length N (part 13); his code default is k = 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import RelativeMethod, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class LeakyReRoPE(RelativeMethod):
    name = "leaky-rerope"
    scale: float = 16.0  # Su's k

    def validate(self) -> None:
        super().validate()
        check_scale("scale", self.scale)

    @property
    def far_freq_divisor(self) -> float:
        return float(self.scale)

    def far_query_position(self, i: torch.Tensor) -> torch.Tensor:
        return i.to(torch.float64) + self.window * (self.scale - 1)

    def far_key_position(self, j: torch.Tensor) -> torch.Tensor:
        return j.to(torch.float64)
