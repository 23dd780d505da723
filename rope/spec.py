"""Methods written as text, the form the CLI and result files use:

    rope
    ntk:scale=2
    rerope:window=4k,logn=true            (4k = 4096)
    leaky-rerope:window=512,scale=16,frequency_method=ntk(scale=2)
    longrope:short_factor=[1,1.5],long_factor=[2,4]

Each parameter may be given once: `ntk:scale=2,scale=3` is refused, and so is a keyword
that repeats a parameter of the text (`parse_method("ntk:scale=2", scale=3)`); keywords
may only add parameters the text leaves out.

`Method.spec()` writes the canonical form back (rope/method.py, `Method.spec`), so
`parse_method(m.spec()) == m`, and equal methods give equal texts.
"""

from __future__ import annotations

from .method import Method
from .registry import get_method

_OPEN, _CLOSE = "([", ")]"


def parse_int_with_suffix(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576); raises ValueError otherwise."""
    t = text.strip().lower()
    for suffix, mult in (("k", 1024), ("m", 1024 * 1024)):
        if t.endswith(suffix) and t[:-1].isdigit():
            return int(t[:-1]) * mult
    if t.lstrip("-").isdigit():
        return int(t)
    raise ValueError(f"{text!r} is not an integer (forms: 4096, 4k, 1m)")


def split_top_level(text: str) -> list[str]:
    """Split at commas outside (...) and [...]."""
    parts, stack, start = [], [], 0
    for pos, char in enumerate(text):
        if char in _OPEN:
            stack.append(_CLOSE[_OPEN.index(char)])
        elif char in _CLOSE:
            if not stack or stack.pop() != char:
                raise ValueError(f"method spec {text!r}: unbalanced {char!r}")
        elif char == "," and not stack:
            parts.append(text[start:pos])
            start = pos + 1
    if stack:
        raise ValueError(f"method spec {text!r}: unclosed {stack[-1]!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if text.startswith("[") and text.endswith("]"):
        return tuple(_parse_value(item) for item in split_top_level(text[1:-1]))
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
        raise ValueError(
            f"value {text!r}: expected a number, true/false, none, [a,b,...] or name(key=value,...)"
        ) from None


def parse_method(spec: str | Method, **extra) -> Method:
    """Build a method from `name:key=value,...`; `extra` keywords add parameters the text
    leaves out. A parameter given twice (in the text, or in the text and as a keyword) is
    refused: ValueError naming it, both values and the rule."""
    if isinstance(spec, Method):
        return spec
    name, _, rest = spec.strip().partition(":")
    params: dict = {}
    for item in split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        parsed = _parse_value(value.strip())
        if key in params:
            raise ValueError(
                f"{key}={parsed!r}: given twice in method spec {spec!r} (first {key}={params[key]!r}); "
                "give each parameter once"
            )
        params[key] = parsed
    for key, value in extra.items():
        if key in params:
            raise ValueError(
                f"{key}={value!r}: given both in method spec {spec!r} ({key}={params[key]!r}) and as a keyword; "
                "give each parameter once (keywords may only add parameters the spec leaves out)"
            )
        params[key] = value
    return get_method(name.strip(), **params)
