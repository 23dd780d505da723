"""LongRoPE: a rescale factor per rotary pair, θ'_i = θ_i / λ_i, one list for short contexts
and one for long (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million
Tokens", arXiv 2402.13753; transformers' `longrope`, which Phi-3 ships with).

As transformers computes it (`_compute_longrope_parameters` and `longrope_frequency_update`
in its modeling_rope_utils): a forward whose current length l (last position + 1) exceeds
the training length L (original_max_position_embeddings) uses `long_factor`, otherwise
`short_factor`; each list has dim/2 entries. The attention factor (multiplies cos and sin)
is `attention_factor` when given, else sqrt(1 + ln s / ln L) for s > 1 and 1 for s ≤ 1,
with s = `scale`, which, left out, is the model's max_position_embeddings / L (Phi-3's rule).

The factors are searched per model and target length (the paper's evolutionary search), so
there is no default: left out, they come from the patched model's config (rope_type
'longrope', as in Phi-3-128k); given lists win over the config's.

Length-dependent, like transformers' `dynamic`: the list follows the length of the whole
forward, so the patch applies it inside attention with keys cached before RoPE (transformers'
own longrope keeps keys rotated with the short factors in its cache once decoding crosses L).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import frequencies as fm
from ..method import Frequencies, Method, check_number, check_positive, check_scale, require
from ..registry import register

FACTOR_FIELDS = ("short_factor", "long_factor")


@register
@dataclass(frozen=True, kw_only=True)
class LongRoPE(Method):
    name = "longrope"
    short_factor: tuple[float, ...] | None = None  # λ_i for l ≤ L (a list is stored as a tuple)
    long_factor: tuple[float, ...] | None = None  # λ_i for l > L
    scale: float | None = None  # s, for the default attention factor; None: from the model
    attention_factor: float | None = None  # None: sqrt(1 + ln s / ln L)

    def validate(self) -> None:
        for field in FACTOR_FIELDS:
            value = getattr(self, field)
            if value is None:
                continue
            require(isinstance(value, (list, tuple)) and len(value) > 0, field, value, "must be a non-empty list of numbers")
            for i, factor in enumerate(value):
                check_number(f"{field}[{i}]", factor)
                require(factor > 0, f"{field}[{i}]", factor, "must be > 0")
            object.__setattr__(self, field, tuple(value))  # frozen and hashable
        given = [f for f in FACTOR_FIELDS if getattr(self, f) is not None]
        require(len(given) != 1, given[0] if given else "", getattr(self, given[0]) if given else None,
                "give short_factor and long_factor together, or neither (then they come from the model's config)")
        if given:
            short, long = self.short_factor, self.long_factor
            require(len(short) == len(long), "long_factor", long,
                    f"must have as many values as short_factor ({len(short)}), not {len(long)}")
        if self.scale is not None:
            check_scale("scale", self.scale)
        if self.attention_factor is not None:
            check_positive("attention_factor", self.attention_factor)

    @property
    def uses_train_length(self) -> bool:
        return True

    @property
    def length_dependent(self) -> bool:
        return True

    def with_model(self, train_length: int, rope_parameters: Mapping | None = None,
                   max_positions: int | None = None) -> Method:
        """Fill in from the model: L, the factor lists and attention factor of a 'longrope'
        config (unless given), and s = the config's factor, else max_positions / L."""
        method = self.with_train_length(train_length)
        params = rope_parameters or {}
        native = params.get("rope_type") == "longrope"
        fill = {}
        if method.short_factor is None and native:
            fill.update(short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"]))
        if method.attention_factor is None and native and params.get("attention_factor") is not None:
            fill["attention_factor"] = float(params["attention_factor"])
        if method.scale is None:
            factor = params.get("factor") if native else None
            if factor is None and max_positions:
                factor = max_positions / method.required_train_length()
            if factor is not None:
                fill["scale"] = max(1.0, float(factor))
        return method.replace(**fill) if fill else method

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        length = self.required_train_length()
        require(self.short_factor is not None, "short_factor", None,
                "longrope needs per-pair factors: give short_factor=[...] and long_factor=[...], "
                "or patch a model whose config has rope_type 'longrope'")
        for field in FACTOR_FIELDS:
            value = getattr(self, field)
            require(len(value) == dim // 2, field, value,
                    f"must have dim/2 = {dim // 2} values (rotary dim {dim}), not {len(value)}")
        factors = self.long_factor if seq_len is not None and seq_len > length else self.short_factor
        inv_freq = fm.rope_inv_freq(dim, base) / torch.tensor(factors, dtype=torch.float64)
        return Frequencies(inv_freq, self.resolved_attention_factor())

    def resolved_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        require(self.scale is not None, "scale", None,
                "longrope's default attention factor needs s (the extension ratio): give scale= or "
                "attention_factor=, or patch a model (s = max_position_embeddings / L)")
        length = self.required_train_length()
        require(self.scale <= 1 or length > 1, "train_length", length, "must be > 1 for the default attention factor")
        return 1.0 if self.scale <= 1 else math.sqrt(1 + math.log(self.scale) / math.log(length))
