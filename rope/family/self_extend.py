"""SelfExtend: r' = r for r < W, else ⌊i/G⌋ - ⌊j/G⌋ + W - ⌊W/G⌋
(Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325; datamllab/LongLM).

Far part: the query is rotated at ⌊i/G⌋ + W - ⌊W/G⌋ and the key at ⌊j/G⌋ (grouped
positions, shifted so the far part continues where the neighbour window ends). The
paper's guidance: G = 2…64, W = 512…1536, with W + (N - W)/G < (1/2…2/3)·L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import RelativeMethod, check_positive_int
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class SelfExtend(RelativeMethod):
    name = "self-extend"
    group: int  # G

    def validate(self) -> None:
        super().validate()
        check_positive_int("group", self.group)

    def far_query_position(self, i: torch.Tensor) -> torch.Tensor:
        shift = self.window - self.window // self.group
        return torch.div(i, self.group, rounding_mode="floor").to(torch.float64) + shift

    def far_key_position(self, j: torch.Tensor) -> torch.Tensor:
        return torch.div(j, self.group, rounding_mode="floor").to(torch.float64)
