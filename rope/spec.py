"""Methods written as text, the form the CLI and result files use:

    rope
    ntk:scale=2
    rerope:window=4k,logn=true            (4k = 4096)
    leaky-rerope:window=512,scale=16,frequency_method=ntk(scale=2)

`Method.spec()` writes this form back, so `parse_method(m.spec()) == m`.
"""

from __future__ import annotations

from .method import Method
from .registry import get_method


def parse_int_with_suffix(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576); raises ValueError otherwise."""
    t = text.strip().lower()
    for suffix, mult in (("k", 1024), ("m", 1024 * 1024)):
        if t.endswith(suffix) and t[:-1].isdigit():
            return int(t[:-1]) * mult
    if t.lstrip("-").isdigit():
        return int(t)
    raise ValueError(f"{text!r} is not an integer (forms: 4096, 4k, 1m)")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ValueError(f"method spec {text!r}: unbalanced ')'")
        if char == "," and depth == 0:
            parts.append(text[start:pos])
            start = pos + 1
    if depth:
        raise ValueError(f"method spec {text!r}: unbalanced '('")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if "(" in text and text.endswith(")"):
        name, inner = text[:-1].split("(", 1)
        return parse_method(f"{name}:{inner}" if inner.strip() else name)
    try:
        return parse_int_with_suffix(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"value {text!r}: expected a number, true/false, none or name(key=value,...)") from None


def parse_method(spec: str | Method, **overrides) -> Method:
    """Build a method from `name:key=value,...`; `overrides` fill fields the text leaves out."""
    if isinstance(spec, Method):
        return spec
    name, _, rest = spec.strip().partition(":")
    params = dict(overrides)
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: {item!r} is not key=value")
        params[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return get_method(name.strip(), **params)
