"""Input checks shared by the eval kinds: each raises ValueError naming the field, the value and the rule,
before anything is loaded or written (docs/design.md, "Bad input")."""

from __future__ import annotations


def as_list(value, name: str, single: tuple[type, ...]) -> list:
    """`value` as a list: one item of a `single` type becomes [item]; other non-iterables are refused."""
    if isinstance(value, single):
        return [value]
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}={value!r}: expected a list")
    return list(value)


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def check_lengths(lengths, name: str = "lengths") -> list[int]:
    """Sorted distinct integer lengths >= 2; one int counts as one length."""
    values = as_list(lengths, name, (int,))
    for n in values:
        check_int(name, n, 2)
    if not values:
        raise ValueError(f"{name}=[]: give at least one length")
    return sorted(set(values))


def check_depths(depths) -> list[float]:
    """Depths as a list of fractions in [0, 1]; one number counts as one depth."""
    values = as_list(depths, "depths", (int, float))
    if not values:
        raise ValueError("depths=[]: give at least one depth between 0 and 1, like 0.1,0.5,0.9")
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"depths: {d!r} must be a number between 0 and 1 (fraction of the filler before the key)")
    return list(dict.fromkeys(float(d) for d in values))
