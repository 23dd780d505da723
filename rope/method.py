"""The shape every position method shares (docs/methods.md, "A method is the
composition of up to three independent parts"):

1. a frequency map `θ_i -> θ'_i` plus an attention factor that multiplies cos and sin;
2. a relative-position map `r -> r'`, computed as a near band (ordinary RoPE) and a far
   part with mapped query/key positions (ReRoPE, Leaky ReRoPE, SelfExtend), or as parts
   with key ranges per query (DCA, STRING, LM-Infinite, sinks: rope/position_method.py);
3. a query scale that depends only on the query's own position (log-n, Su's post-hoc
   variant: `max(1, ln(p+1)/ln L)`).

A method is a frozen, keyword-only dataclass. Subclasses override `frequencies()` for part
1, inherit `RelativeMap` for part 2, and every method takes `logn` for part 3. Nothing
here knows about transformers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch

from . import frequencies as fm


class Frequencies(NamedTuple):
    inv_freq: torch.Tensor  # (dim/2,) float64
    attention_factor: float  # multiplies cos and sin, so the logits by its square


def require(ok: bool, field: str, value, rule: str) -> None:
    """Raise the one error shape the library uses for bad parameters."""
    if not ok:
        raise ValueError(f"{field}={value!r}: {rule}")


def check_number(field: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(ok, field, value, "must be a finite number")


def check_positive(field: str, value) -> None:
    check_number(field, value)
    require(value > 0, field, value, "must be > 0")


def check_scale(field: str, value) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool), field, value, "must be a number")
    require(math.isfinite(value) and value >= 1, field, value, "must be a finite number >= 1 (1 means no scaling)")


def check_positive_int(field: str, value) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, value, "must be an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class Method:
    """Plain RoPE frequencies, identity relative map, optional log-n. Subclasses change parts."""

    name: ClassVar[str] = ""

    train_length: int | None = None  # L: original_max_position_embeddings, else max_position_embeddings
    logn: bool = False

    def __post_init__(self) -> None:
        if self.train_length is not None:
            check_positive_int("train_length", self.train_length)
        require(isinstance(self.logn, bool), "logn", self.logn, "must be True or False")
        self.validate()

    def validate(self) -> None:
        """Subclasses check their own fields here (called from __post_init__)."""

    # -- part 1: frequency map ---------------------------------------------------------
    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        """Inverse frequencies for a rotary dimension `dim` and RoPE base `base`.

        `seq_len` is the current sequence length (per query with per-query frequencies);
        only dynamic-ntk reads it.
        """
        return Frequencies(fm.rope_inv_freq(dim, base), 1.0)

    # -- part 2: relative-position map -------------------------------------------------
    @property
    def key_rotations_cacheable(self) -> bool:
        """Whether a key's rotated forms depend only on its own position, so a KV cache may
        keep them rotated; False when the frequencies follow a length (dynamic-ntk)."""
        return not (self.length_dependent or self.per_query_frequencies)

    @property
    def relative(self) -> RelativeMap | None:
        return self if isinstance(self, RelativeMap) else None

    @property
    def key_range_parts(self) -> bool:
        """True when attention is a list of parts, each a key range per query row with its own
        rotation (dca, string, lm-infinite, sinks: `kernel_parts()`, rope/position_method.py)."""
        return False

    # -- part 3: query scale -----------------------------------------------------------
    def query_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Per-query multiplier `max(1, ln(p+1)/ln L)` when `logn`, else None (no scaling)."""
        if not self.logn:
            return None
        length = self.required_train_length()
        # Positions below 0 occur for left padding; clamping keeps their (masked) rows finite,
        # since a NaN there would reach real tokens through 0 × NaN in the next layer.
        scale = torch.log((positions.to(torch.float64) + 1).clamp(min=1.0)) / math.log(length)
        return scale.clamp(min=1.0)

    # -- capabilities: plain properties, overridden by the methods they differ for -------
    @property
    def length_dependent(self) -> bool:
        """True when every position's encoding depends on the current sequence length, so a
        prefix's logits change as the sequence grows and the cache must hold keys before RoPE."""
        return False

    @property
    def per_query_frequencies(self) -> bool:
        """True when each query needs the frequencies of its own length (position + 1), so
        the patch must route attention through ropelab although the method is
        prefix-consistent (dynamic-ntk with per_query=True). The attention function relies
        on lengths ≤ L all having the frequencies of L (patches/attention_fn.py, `_per_query`)."""
        return False

    @property
    def uses_train_length(self) -> bool:
        """True when `frequencies()` needs the model's training length."""
        return False

    @property
    def needs_train_length(self) -> bool:
        """True when the frequencies or the query scale (log-n) need the training length."""
        return self.uses_train_length or self.logn

    @property
    def needs_attention_route(self) -> bool:
        """True when the method cannot be a rewrite of the rotary frequencies: a relative map,
        frequencies that follow the length (per forward or per query), or log-n's query scale.
        The patch then applies RoPE inside attention, with keys cached before RoPE."""
        return (self.relative is not None or self.key_range_parts or self.length_dependent
                or self.per_query_frequencies or self.logn)

    # -- helpers -----------------------------------------------------------------------
    def required_train_length(self) -> int:
        if self.train_length is None:
            raise ValueError(
                f"train_length=None: method {self.name!r} needs the model's training length; "
                "pass train_length=... or patch a model (which supplies it)"
            )
        return self.train_length

    def with_train_length(self, train_length: int) -> Method:
        """This method with `train_length` filled in where it was left to the model."""
        if self.train_length is not None:
            return self
        return dataclasses.replace(self, train_length=train_length)

    def with_model(self, train_length: int, rope_parameters: Mapping | None = None,
                   max_positions: int | None = None) -> Method:
        """This method with what it leaves to the model filled in from one rotary site of it:
        the training length, and whatever else a method reads from the model's rope
        parameters (`longrope`'s factor lists). A value the method already has wins."""
        return self.with_train_length(train_length)

    def replace(self, **fields) -> Method:
        """A copy with `fields` changed, validated again."""
        return dataclasses.replace(self, **fields)

    @property
    def params(self) -> dict:
        """The fields a user set, in declaration order (for records and descriptions)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The canonical text `name:key=value,...`, the form the CLI accepts.

        The method's own fields in declaration order, then frequency_method, train_length and
        logn; fields equal to their default left out, numbers in one
        form (`spec_value`), nested methods as `name(key=value,...)`. So equal methods give
        equal texts (`a == b` implies `a.spec() == b.spec()`) and `parse_method(m.spec()) == m`;
        it is not the text the user typed (`4k` comes back as `4096`, `scale=2.0` as `scale=2`).
        """
        parts = []
        late = {"frequency_method": 1, "train_length": 2, "logn": 2}  # shared fields after the method's own
        for f in sorted(dataclasses.fields(self), key=lambda f: late.get(f.name, 0)):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={spec_value(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")


def spec_value(value) -> str:
    """One canonical text per value, so that equal values (2 == 2.0) are written alike:
    integral numbers as integers (`2`, never `2.0`), other floats by their shortest
    round-trip repr, booleans `true`/`false`, None `none`, tuples `[a,b,...]`, methods
    `name(key=value,...)`."""
    if isinstance(value, Method):
        name, _, inner = value.spec().partition(":")
        return f"{name}({inner})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple):
        return "[" + ",".join(spec_value(v) for v in value) + "]"
    raise TypeError(f"{value!r}: no spec text for a value of type {type(value).__name__}")


class RelativeMap:
    """Part 2 of a method: ordinary RoPE for distances r = i - j < window (the near band),
    and for r ≥ window a far part where the query is rotated at `far_query_position(i)` and
    the key at `far_key_position(j)`, both with frequencies θ'/far_freq_divisor.

    The logit of the far part then depends on the mapped distance
    `mapped_distance(i, j) = (far_query_position(i) - far_key_position(j)) / far_freq_divisor`
    measured in units of the unscaled frequencies.
    """

    window: int

    # False when every far key sits at position 0 (ReRoPE): far keys are then used unrotated.
    far_keys_rotated: ClassVar[bool] = True

    @property
    def far_freq_divisor(self) -> float:
        """The far part's frequencies are θ'/far_freq_divisor (Leaky ReRoPE's k; 1 otherwise)."""
        return 1.0

    def far_query_position(self, i: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def far_key_position(self, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mapped_distance(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """r' for query position i and key position j (j ≤ i), float64; the reference the kernels are tested against."""
        i, j = torch.as_tensor(i, dtype=torch.float64), torch.as_tensor(j, dtype=torch.float64)
        far = (self.far_query_position(i) - self.far_key_position(j)) / self.far_freq_divisor
        return torch.where(i - j < self.window, i - j, far)


@dataclass(frozen=True, kw_only=True)
class BorrowedFrequencies(Method):
    """A method whose frequency map is another, frequency-only method's: `frequency_method`
    (e.g. `ntk` under Leaky ReRoPE or under a sinusoidal table; None means plain RoPE).
    That is how compositions need no code of their own."""

    frequency_method: Method | None = None

    def validate(self) -> None:
        inner = self.frequency_method
        if inner is None:
            return
        require(isinstance(inner, Method), "frequency_method", inner, "must be a ropelab method (get_method(...))")
        require(
            inner.relative is None and not isinstance(inner, BorrowedFrequencies),
            "frequency_method",
            inner.spec(),
            "must be a frequency-only method (rope, linear, ntk, ntk-old, beta-base, dynamic-ntk, yarn, llama3, longrope)",
        )
        require(not inner.logn, "frequency_method", inner.spec(), "must not set logn; set logn on the outer method")
        require(
            inner.train_length in (None, self.train_length),
            "frequency_method.train_length",
            inner.train_length,
            f"must be None or equal to train_length={self.train_length}",
        )

    @property
    def uses_train_length(self) -> bool:
        return self.frequency_method is not None and self.frequency_method.needs_train_length

    @property
    def length_dependent(self) -> bool:
        return self.frequency_method is not None and self.frequency_method.length_dependent

    @property
    def per_query_frequencies(self) -> bool:
        return self.frequency_method is not None and self.frequency_method.per_query_frequencies

    def with_model(self, train_length: int, rope_parameters: Mapping | None = None,
                   max_positions: int | None = None) -> Method:
        method = self.with_train_length(train_length)
        inner = method.frequency_method
        if inner is None:
            return method
        filled = inner.with_model(method.required_train_length(), rope_parameters, max_positions)
        return method if filled == inner else method.replace(frequency_method=filled)

    def borrowed_frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        inner = self.frequency_method or Method()
        if self.train_length is not None:
            inner = inner.with_train_length(self.train_length)
        return inner.frequencies(dim, base, seq_len)


@dataclass(frozen=True, kw_only=True)
class RelativeMethod(BorrowedFrequencies, RelativeMap):
    """Base of ReRoPE, Leaky ReRoPE and SelfExtend: a window plus borrowed frequencies.

    A window at or beyond the sequence length makes the far part empty: the method is then
    plain RoPE (over `frequency_method`). That is allowed, and is how the equivalence tests
    check the kernels.
    """

    window: int

    def validate(self) -> None:
        check_positive_int("window", self.window)
        super().validate()

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return self.borrowed_frequencies(dim, base, seq_len)
