"""LM-Infinite's Λ-shaped attention (Han et al. 2023, "LM-Infinite: Simple On-the-Fly Length
Generalization for Large Language Models", arXiv 2308.16137; code
github.com/Glaciohound/LM-Infinite).

Each query sees its last n_local keys with RoPE and the first n_global tokens of the text
with the distance capped at n_local (the query at n_local, the key unrotated); nothing else.
A distance band plus a key-prefix part, merged by row log-sum-exp; the mask is never
materialised. Defaults: n_local = L (the training length, also the distance limit) and
n_global = 10 (the README's drop-in call). Cached decoding equals prefill: the map depends on
(i, j) only (rope/position_maps.py `lm_infinite_map`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..position_method import PartsMethod
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class LMInfinite(PartsMethod):
    name = "lm-infinite"
    n_global: int = 10
    n_local: int | None = None  # None: L
