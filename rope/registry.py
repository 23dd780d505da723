"""Methods registered by name, after lm-evaluation-harness's registry: duplicates are
refused, and an unknown name is answered with "did you mean …? available: …"."""

from __future__ import annotations

import dataclasses
import difflib

from .method import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` reachable as `get_method(cls.name, ...)`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty: a registered method needs a name")
    if cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"method={name!r}: unknown method.{hint} available: {', '.join(methods())}")
    return _REGISTRY[name]


def get_method(name: str, **params) -> Method:
    """Build the method `name` with `params`, validated (ValueError names field, value, rule)."""
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [p for p in params if p not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{unknown[0]}={params[unknown[0]]!r}: not a parameter of {name!r}.{hint} "
            f"parameters: {', '.join(fields)}"
        )
    missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.name not in params]
    if missing:
        raise ValueError(f"{missing[0]}=<missing>: {name!r} requires {', '.join(missing)}")
    return cls(**params)
