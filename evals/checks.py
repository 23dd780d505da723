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


def split_list(text: str, flag: str, example: str) -> list[str]:
    """The items of a comma-separated command-line list, stripped. An empty list or an empty item
    (`16,,32`, a leading or trailing comma) is a ValueError naming the flag, the value and the
    rule: a typo in a list is refused, never read as a shorter list."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ValueError(f"{flag} {text!r}: give at least one value, like {example}")
    if not all(items):
        raise ValueError(f"{flag} {text!r}: item {items.index('') + 1} is empty; the rule: comma-separated "
                         f"values with none empty, like {example}")
    return items


def split_methods(text: str, flag: str = "--methods") -> list[str]:
    """'rope,ntk:scale=2,logn=true,rerope:window=4k' -> ['rope', 'ntk:scale=2,logn=true', 'rerope:window=4k'].

    A comma-separated item with '=' but no ':' continues the previous method's parameters;
    commas inside (...) belong to a nested method. Empty items are refused as `split_list` does.
    """
    items, depth, current = [], 0, ""
    for char in text + ",":
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    if not any(items):
        raise ValueError(f"{flag} {text!r}: give at least one method, like rope,ntk:scale=2 (see `ropelab methods`)")
    if not all(items):
        raise ValueError(f"{flag} {text!r}: item {items.index('') + 1} is empty; the rule: comma-separated "
                         "method specs with none empty, like rope,ntk:scale=2")
    methods: list[str] = []
    for item in items:
        if "=" in item and ":" not in item.split("=", 1)[0] and methods:
            methods[-1] += "," + item
        else:
            methods.append(item)
    return methods
