"""Inverse Leaky ReRoPE, a *training-time* map: r' = r for r < w, else w + (r - w)·s
(Su, Transformer升级之路 13, "逆用Leaky ReRoPE", kexue.fm/archives/9728).

Leaky ReRoPE at inference compresses far distances by k; trained with the inverse map
(Su's k < 1, written here as the stretch s = 1/k ≥ 1) a model of training length L sees
relative positions up to w + (L - 1 - w)·s, so at inference plain RoPE can run to that
length without positions it never saw. s = 1 is plain RoPE.

Far part, as Leaky ReRoPE with k = 1/s: with frequencies θ·s (`far_freq_divisor` = 1/s),
the query is rotated at i - w(1 - 1/s) and the key at j, so the angle is
((i - j) - w + w/s)·s·θ = (w + (r - w)·s)·θ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import RelativeMethod, check_scale
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class InverseLeakyReRoPE(RelativeMethod):
    name = "inverse-leaky-rerope"
    scale: float = 16.0  # s = 1/k: how much far distances are stretched

    def validate(self) -> None:
        super().validate()
        check_scale("scale", self.scale)

    @property
    def far_freq_divisor(self) -> float:  # type: ignore[override]
        return 1.0 / float(self.scale)

    def far_query_position(self, i: torch.Tensor) -> torch.Tensor:
        return i.to(torch.float64) - self.window * (1.0 - 1.0 / self.scale)

    def far_key_position(self, j: torch.Tensor) -> torch.Tensor:
        return j.to(torch.float64)
