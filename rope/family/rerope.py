"""ReRoPE: r' = min(r, w) (Su, Transformer升级之路 12, kexue.fm/archives/9708; bojone/rerope).

Far part (r ≥ w): the query is rotated at the constant position w and the key is not
rotated, so every far logit sees relative position exactly w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import RelativeMethod
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class ReRoPE(RelativeMethod):
    name = "rerope"
    far_keys_rotated = False  # far_key_position is 0 for every key

    def far_query_position(self, i: torch.Tensor) -> torch.Tensor:
        return torch.full_like(i, self.window, dtype=torch.float64)

    def far_key_position(self, j: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(j, dtype=torch.float64)
