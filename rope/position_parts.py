"""The maps of rope/position_maps.py cut into parts an attention kernel can compute one at a
time and merge by row log-sum-exp (the scheme rope/attention.py uses for ReRoPE's near and
far parts). Sources are those of position_maps.py.

A part is: for query position i, the keys at positions [key_start(i), key_stop(i)) (clipped
to [0, i]); the query rotated at query_position(i); each key at key_position(j), or not at
all when key_position is None (the key's rotation is position 0, as in ReRoPE's far part);
frequencies θ/freq_divisor. The parts of a method are disjoint and together give exactly
the visible pairs of its map at the same distances (tests/rope/test_position_maps.py).

    method       part        keys of query i                      q at                  k at
    dca          intra       [n·C, i]                             i mod C               j mod C
    (C = stride) successive  [(n-1)·C, n·C)                       min(i mod C + C, cs)  j mod C
                 inter       [0, (n-1)·C)                         min(2C - 1, cs)       j mod C
    string       near        [i - S + 1, i]                       i                     j
                 shifted     [0, i - S]                           i - S + W             j
    lm-infinite  local       [i - n_local + 1, i]                 i                     j
                 global      [0, min(n_global, i - n_local + 1))  n_local               (none)
    sinks        recent      [i - window, i]                      i                     j
                 sink        [0, min(sinks, i - window))          min(i, sinks+window)  j

with n = ⌊i/C⌋, C = chunk_size - local_window, cs = chunk_size. Query and key positions
only matter through their difference, so "q at i, k at j" may be read as any common shift:
DCA's intra part is plain RoPE over the chunk, the sinks' recent part is plain RoPE over a
band of window + 1 keys. `band` marks the parts that are distance bands with these
rotations; `key_form` names the parts whose keys are rotated alike (one cached copy each).
Kernel shapes: string's and the recent/local parts are distance
bands (lo ≤ i - j < hi); DCA's parts are chunk-aligned rectangles and triangles (one query
block per chunk); the global and sink parts are a fixed key prefix [0, n) seen from r ≥ hi.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .position_checks import check_params

__all__ = ["Part", "parts"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Part:
    name: str
    key_start: Fn  # i -> first key position (inclusive), int64
    key_stop: Fn  # i -> last key position + 1, int64 (clipped to i + 1 by the user)
    query_position: Fn  # i -> position the query is rotated at
    key_position: Fn | None  # j -> position the key is rotated at; None: not rotated
    freq_divisor: float = 1.0
    # (lo, hi): the part is exactly the distance band lo <= i - j < hi (hi None: no upper
    # edge), which kernels compute without per-row ranges; None: a general key range.
    band: tuple[int, int | None] | None = None
    # Parts whose keys are rotated alike (same key_position and freq_divisor) share one
    # rotated copy of the keys under this name (a KV cache keeps one copy per name).
    key_form: str | None = "near"


def _floor(x, d):
    return torch.div(x, d, rounding_mode="floor")


def _dca(chunk_size, local_window):
    C, cs = chunk_size - local_window, chunk_size
    start = lambda i: _floor(i, C) * C  # noqa: E731  (the first key of i's chunk)
    kpos = lambda j: j - _floor(j, C) * C  # noqa: E731
    return [
        Part("intra", start, lambda i: i + 1, lambda i: i - start(i), kpos, key_form="chunk"),
        Part("successive", lambda i: start(i) - C, start, lambda i: torch.clamp(i - start(i) + C, max=cs), kpos,
             key_form="chunk"),
        Part("inter", lambda i: torch.zeros_like(i), lambda i: start(i) - C,
             lambda i: torch.full_like(i, min(2 * C - 1, cs)), kpos, key_form="chunk"),
    ]


def _string(shift, local_window, attention_factor=None):
    S, W = shift, local_window
    return [
        Part("near", lambda i: i - S + 1, lambda i: i + 1, lambda i: i, lambda j: j, band=(0, S)),
        Part("shifted", lambda i: torch.zeros_like(i), lambda i: i - S + 1, lambda i: i - S + W, lambda j: j,
             band=(S, None)),
    ]


def _lm_infinite(n_global, n_local):
    return [
        Part("local", lambda i: i - n_local + 1, lambda i: i + 1, lambda i: i, lambda j: j, band=(0, n_local)),
        Part("global", lambda i: torch.zeros_like(i), lambda i: torch.clamp(i - n_local + 1, max=n_global),
             lambda i: torch.full_like(i, n_local), None, key_form=None),
    ]


def _sinks(sinks, window):
    cache = sinks + window
    return [
        Part("recent", lambda i: i - window, lambda i: i + 1, lambda i: i, lambda j: j, band=(0, window + 1)),
        Part("sink", lambda i: torch.zeros_like(i), lambda i: torch.clamp(i - window, max=sinks),
             lambda i: torch.clamp(i, max=cache), lambda j: j),
    ]


_BUILDERS = {"dca": _dca, "string": _string, "lm-infinite": _lm_infinite, "sinks": _sinks}


def parts(name: str, params: dict, train_length: int | None = None) -> list[Part]:
    """The parts of method `name` with `params` (validated first)."""
    if name not in _BUILDERS:
        raise ValueError(f"name={name!r}: must be one of {sorted(_BUILDERS)}")
    check_params(name, params, train_length)
    return _BUILDERS[name](**params)
