"""Base of the chunked, shifted and masked methods (`dca`, `string`, `lm-infinite`,
`sinks`): attention as a list of parts, each a contiguous key range per query row with its
own query/key positions and frequency divisor (rope/position_parts.py), whose float64
oracles are in rope/position_maps.py (sources cited there).

A method of this kind keeps its map's parameters as optional fields: left out (None), each
takes its authors' default for the model's training length L (`position_maps.default_params`),
so `get_method("dca")` patched into a model trained at 8k uses ChunkLlama's 3L/4 and L/8.
Every parameter is checked by rope/position_checks.py once L is known (at patch time) or as
soon as all parameters are given. Frequencies may be borrowed from a frequency-only method
(`frequency_method`), as for ReRoPE and SelfExtend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .method import BorrowedFrequencies, Frequencies
from .position_checks import check_params
from .position_maps import default_params
from .position_parts import Part, parts

__all__ = ["PartsMethod"]


@dataclass(frozen=True, kw_only=True)
class PartsMethod(BorrowedFrequencies):
    """Subclasses declare their map parameters as fields defaulting to None (= the authors'
    default for the training length) and name the map in `map_name`."""

    @property
    def map_name(self) -> str:
        return self.name

    def _map_fields(self) -> list[str]:
        shared = {"train_length", "logn", "frequency_method"}
        return [f.name for f in dataclasses.fields(self) if f.name not in shared]

    def validate(self) -> None:
        super().validate()
        given = {f: getattr(self, f) for f in self._map_fields() if getattr(self, f) is not None}
        if self.train_length is not None:
            check_params(self.map_name, self.map_params(), self.train_length)
        elif len(given) == len(self._map_fields()):
            check_params(self.map_name, given)
        else:  # the rest come from L later; check the given ones' types and ranges now
            for field, value in given.items():
                _check_alone(field, value)

    def map_params(self) -> dict:
        """Every parameter of the map: the given ones, the rest the authors' defaults for L."""
        values = {f: getattr(self, f) for f in self._map_fields()}
        if any(v is None for v in values.values()):
            defaults = default_params(self.map_name, self.required_train_length())
            values = {f: defaults[f] if v is None else v for f, v in values.items()}
        return values

    @property
    def uses_train_length(self) -> bool:
        return super().uses_train_length or any(getattr(self, f) is None for f in self._map_fields())

    @property
    def key_range_parts(self) -> bool:
        return True

    def kernel_parts(self) -> list[Part]:
        """The parts the attention kernel computes and merges (rope/kernels/plan.py)."""
        return parts(self.map_name, self.map_params(), self.train_length)

    def frequencies(self, dim: int, base: float, seq_len: int | None = None) -> Frequencies:
        return self.borrowed_frequencies(dim, base, seq_len)


def _check_alone(field: str, value) -> None:
    """The type and range rule of one parameter, before the others (and the rules relating
    them, checked once the training length fills them in) are known."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"{field}={value!r}: must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{field}={value!r}: must be a finite number")
    low = 0 if field in ("local_window", "n_global", "sinks") else 1
    if isinstance(value, float) and field != "attention_factor":
        raise ValueError(f"{field}={value!r}: must be an integer >= {low}")
    if field == "attention_factor":
        if value <= 0:
            raise ValueError(f"{field}={value!r}: must be a finite number > 0")
    elif value < low:
        raise ValueError(f"{field}={value!r}: must be an integer >= {low}")
