"""Parameter rules of the chunked, shifted and masked methods (rope/position_maps.py has
their maps and sources). Each check raises ValueError("field=value: rule") before anything
is built, like every other ropelab parameter error.

A parameter at or beyond the sequence is allowed: DCA with every position ≤ chunk_size,
STRING with shift > every distance, LM-Infinite with n_local > every distance and sinks with
every position ≤ sinks + window are plain RoPE (`position_maps.reduces_to_rope`). With
`train_length` (L) given, the largest distance a method produces must stay where the
authors keep it: DCA's chunk_size < L (their 3L/4), LM-Infinite's n_local ≤ L (their L),
the sinks cache sinks + window ≤ L (StreamingLLM README FAQ: the cache never exceeds the
pretraining window).
"""

from __future__ import annotations

import math

__all__ = ["check_dca", "check_lm_infinite", "check_params", "check_sinks", "check_string"]


def _fail(field: str, value, rule: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {rule}")


def _int(field: str, value, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise _fail(field, value, f"must be an integer >= {low}")


def _train_length(value) -> None:
    if value is not None:
        _int("train_length", value, 1)


def check_dca(chunk_size, local_window, train_length=None) -> None:
    _int("chunk_size", chunk_size, 1)
    _int("local_window", local_window, 0)
    _train_length(train_length)
    if 2 * local_window >= chunk_size:
        raise _fail("local_window", local_window,
                    f"must be < chunk_size - local_window (the chunk stride), i.e. < chunk_size/2 = {chunk_size / 2:g}; "
                    "the successive-chunk window must fit inside one chunk")
    if train_length is not None and chunk_size >= train_length:
        raise _fail("chunk_size", chunk_size,
                    f"must be < train_length={train_length}: it is the largest distance DCA uses "
                    "(ChunkLlama sets 3/4 of the training length)")


def check_string(shift, local_window, attention_factor=1.0, train_length=None) -> None:
    _int("shift", shift, 1)
    _int("local_window", local_window, 0)
    _train_length(train_length)
    if local_window > shift:
        raise _fail("local_window", local_window,
                    f"must be <= shift={shift}: far keys move to r - shift + local_window, closer, never further "
                    "(local_window = shift is plain RoPE)")
    ok = isinstance(attention_factor, (int, float)) and not isinstance(attention_factor, bool)
    if not (ok and math.isfinite(attention_factor) and attention_factor > 0):
        raise _fail("attention_factor", attention_factor, "must be a finite number > 0")


def check_lm_infinite(n_global, n_local, train_length=None) -> None:
    _int("n_global", n_global, 0)
    _int("n_local", n_local, 1)
    _train_length(train_length)
    if train_length is not None and n_local > train_length:
        raise _fail("n_local", n_local,
                    f"must be <= train_length={train_length}: it is the local window and the distance limit, "
                    "which LM-Infinite sets to the training length")


def check_sinks(sinks, window, train_length=None) -> None:
    _int("sinks", sinks, 0)
    _int("window", window, 1)
    _train_length(train_length)
    if sinks > window:
        raise _fail("sinks", sinks, f"must be <= window={window}: a few sink tokens beside a recent window")
    if train_length is not None and sinks + window > train_length:
        raise _fail("window", window,
                    f"sinks + window = {sinks + window} must be <= train_length={train_length}: the cache "
                    "assigns positions up to sinks + window, and StreamingLLM keeps its cache within the "
                    "pretraining window")


_CHECKS = {"dca": check_dca, "string": check_string, "lm-infinite": check_lm_infinite, "sinks": check_sinks}
_FIELDS = {"dca": {"chunk_size", "local_window"}, "string": {"shift", "local_window", "attention_factor"},
           "lm-infinite": {"n_global", "n_local"}, "sinks": {"sinks", "window"}, "rope": set()}
_OPTIONAL = {"string": {"attention_factor"}}


def check_params(name: str, params: dict, train_length=None) -> None:
    """Validate `params` of method `name`: known fields only, all required ones, each rule."""
    if name not in _FIELDS:
        raise _fail("name", name, f"must be one of {sorted(_FIELDS)}")
    fields = _FIELDS[name]
    unknown = sorted(set(params) - fields)
    if unknown:
        raise _fail(unknown[0], params[unknown[0]], f"is not a parameter of {name}; it takes {sorted(fields)}")
    missing = sorted(fields - set(params) - _OPTIONAL.get(name, set()))
    if missing:
        raise _fail(missing[0], None, f"is required by {name}")
    if name in _CHECKS:
        _CHECKS[name](**params, train_length=train_length)
