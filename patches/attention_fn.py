"""The attention function ropelab registers with transformers for methods that need the
unrotated queries and keys: relative-position maps (ReRoPE, Leaky ReRoPE, SelfExtend),
length-dependent frequencies (dynamic NTK, emozilla 2023), per-query frequencies (dynamic
NTK with per_query=true: row p uses the frequencies for length p + 1, see `_per_query`) and
log-n (docs/design.md, "How a method gets into a model").

The patch makes the rotary module return cos = 1, sin = 0, so the model's own
`apply_rotary_pos_emb` is an exact identity and its KV cache holds keys *before* RoPE;
RoPE is then applied here, per call, by `ropelab.attention.rotary_attention`. That is what
makes cached decoding exact for dynamic NTK (keys before RoPE: YaRN paper §3.3;
transformers' own `dynamic` caches stale rotations, issue 25104).

Two functions are registered under the one name `ropelab`:
- `ropelab_attention` with `AttentionInterface` (the attention itself);
- `padding_mask` with `AttentionMaskInterface`. Without a mask function registered under the
  same name, transformers hands a custom attention `attention_mask=None` and padding is
  silently ignored (measured). This one hands over the 2D padding mask (B, S), True = real
  token; causality and sliding windows are applied by `rotary_attention` itself.

What reaches the attention function in transformers 5.23 (measured on the 15 families that
dispatch through it): `scaling`, `dropout`, `position_ids` (shape (1, T) when the model
built them, (B, T) when given), `sliding_window` (Mistral, Qwen2/3, Phi3, Gemma2/3: None on
full-attention layers), `softcap` (Gemma2/3), sometimes `use_cache`. The key positions are
not passed; they follow from the query positions because the cache holds consecutive keys:
key index 0 sits at position `position_ids[:, -1] - (S - 1)`.

With a KV cache, the rotated forms of its keys are kept on the cache layer
(patches/key_cache.py), so a decoding step rotates only its new query and key rows (they
are built by the first call that finds keys already cached, never during a prefill into
an empty cache, whose peak is therefore lean mode's); the
cache object reaches this function through a forward pre-hook on each attention module
(`capture_cache`), since transformers does not pass it to attention functions.

A decoding step (a few query rows, on the CPU) calls this function once per layer with the
same positions, so what follows from them alone is worked out by the first layer and
reused by the others (`Step`): the offsets, the cos/sin of the new keys' rotated forms and
the plan of the attention (kernels/plan.py `StepPlan`: its parts and the query rows'
cos/sin). A step is found by the values it follows from (the last position of each
sequence, the shapes, the method and frequencies, the window, scale and soft-cap, and the
padding mask's contents), never by a tensor's identity, so no crop, reorder or new step
can find a stale one. Per layer and step, this bookkeeping had cost several times the
Python work of an SDPA call (README, issue 9's decode section).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels.plan import StepPlan, build_plan, key_form_rows, rotate_key_forms, step_plan
from ..kernels.tables import Rows
from ..method import Method
from . import evict, key_cache

NAME = "ropelab"
# Calls with at most this many query rows share their step's positions and plan across layers.
STEP_ROWS = 64
# Steps remembered per patched model: one per distinct (layer kind, window) of a step.
STEPS_KEPT = 8


@dataclass
class Step:
    """What every layer of one decoding step shares: the position of key index 0 per
    sequence, the cos/sin of the new keys' rotated forms (None when none are kept), the
    padding mask it was made for, and the step's plan once the first layer has built it."""

    offset: torch.Tensor  # (B,) int64
    key_rows: dict[str, Rows] | None  # key form -> its cos/sin at the query positions
    mask: torch.Tensor | None
    plan: StepPlan | None = None


@dataclass
class PositionState:
    """Positions seen by the patched rotary module in the current forward (a fallback for
    families whose attention does not forward `position_ids`); shared by every route of one
    patched model, and so the home of the steps its layers share."""

    position_ids: torch.Tensor | None = None
    steps: dict = field(default_factory=dict)  # step key (`_step`) -> Step, oldest first


@dataclass
class Route:
    """Everything the attention function needs for one attention module."""

    method: Method
    layout: str  # "half" or "interleaved"
    dim: int  # rotary dimension
    base: float  # rope_theta of this layer's rotary
    inv_freq: torch.Tensor | None  # (dim/2,) float64; None when frequencies follow a length
    attention_factor: float
    positions: PositionState
    key_cache: str = "kept"  # "kept": rotated keys kept on the cache layer; "lean": rotated per call
    calls: int = 0
    # the KV cache of the current forward (weakly: a dropped cache must be freed), or None
    cache: weakref.ref | None = None
    share: int | None = None  # routes with equal method, layout, frequencies and factor share steps
    _by_length: dict = field(default_factory=dict)  # seq_len -> (inv_freq, factor), when inv_freq is None

    def frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if self.inv_freq is not None:
            return self.inv_freq, self.attention_factor
        if seq_len not in self._by_length:
            if len(self._by_length) > 64:
                self._by_length.clear()
            freq = self.method.frequencies(self.dim, self.base, seq_len)
            self._by_length[seq_len] = (freq.inv_freq, float(freq.attention_factor))
        return self._by_length[seq_len]


# attention module -> its route. Weak, so a deleted model leaves nothing behind.
ROUTES: weakref.WeakKeyDictionary[nn.Module, Route] = weakref.WeakKeyDictionary()
# (method, layout, frequencies' bytes, factor) -> token; equal routes of any layer get one token
_SHARED: dict = {}
_TOKENS = itertools.count()


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """The 2D padding mask (B, kv_length) aligned with the keys, True = real; None if none is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)[:, -kv_length:]
    if mask.shape[-1] < kv_length:  # as transformers pads it: keys past the mask are not real
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=False)
    return None if bool(mask.all()) else mask


def ropelab_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, position_ids=None, **kwargs):
    """query (B,H,T,D), key/value (B,Hkv,S,D) before RoPE -> ((B,T,H,Dv), None)."""
    from ..attention import rotary_attention  # the kernel (rope/attention.py)

    route = ROUTES.get(module)
    if route is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}): config._attn_implementation="
            f"{NAME!r} but this module is not patched by ropelab (a copy of a patched model?). "
            "Patch the model itself with ropelab.patches.patch"
        )
    if dropout and dropout > 0:
        raise NotImplementedError(f"dropout={dropout}: the ropelab attention does not apply attention dropout; use model.eval()")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: a patched model takes the 2D padding mask (B, S) only"
        )
    layer = _cache_layer(module, route, key, query.shape[2])
    if layer is not None and layer[1].count != key.shape[2]:  # a static layer's buffer: its written rows only
        count = layer[1].count
        key, value = key[:, :, :count], value[:, :, :count]
        attention_mask = None if attention_mask is None else attention_mask[:, :count]
    hole = None if layer is None else evict.layer_eviction(route.cache(), layer[0], route.method)
    if hole is not None:  # an evicting cache (patches/evict.py): cache positions, the mask without the hole
        attention_mask = evict.cut_mask(attention_mask, hole)
    batch, key_length = query.shape[0], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != key_length:
        raise NotImplementedError(
            f"padding mask covers {attention_mask.shape[-1]} keys but the cache returned {key_length}: "
            "a cache layer type the ropelab attention does not read (patches/key_cache.py); use DynamicCache"
        )
    positions = position_ids if position_ids is not None else route.positions.position_ids
    if positions is None:
        raise RuntimeError(f"{type(module).__name__}: no position_ids reached the ropelab attention")
    if hole is not None and hole.evicted:
        positions = positions - hole.evicted
    step = _step(route, positions, query, key, value, attention_mask, sliding_window, scaling, softcap)
    offset = step.offset if step is not None else _key_offset(positions, batch, key_length, query.device)

    forms = None if layer is None else _key_forms(route, *layer, query, key, offset, step)

    def run(seq_len, rows=slice(None), queries=slice(None), keys=slice(None)):
        """Attention of sequences `rows`, query rows `queries` over key indices `keys` (a
        prefix: the queries stay the last of the keys, key index 0 keeps its offset)."""
        inv_freq, factor = route.frequencies(seq_len)
        # slice first (a view), then pick rows (a copy of the slice only)
        mask = None if attention_mask is None else attention_mask[:, keys][rows]
        return rotary_attention(
            query[:, :, queries][rows], key[:, :, keys][rows], value[:, :, keys][rows], route.method, inv_freq,
            attention_factor=factor, layout=route.layout, position_offset=offset[rows],
            key_padding_mask=mask, sliding_window=sliding_window, scale=scaling, softcap=softcap,
            key_forms=forms,
        )  # (B, H, T, Dv)

    def groups(values):
        """(rows, value) per distinct value in (B,) `values`; one group is all rows, not copied."""
        distinct = torch.unique(values).tolist()
        if len(distinct) == 1:
            return [(slice(None), distinct[0])]
        return [((values == v).nonzero().flatten(), v) for v in distinct]

    if step is not None:
        out = _run_step(step, route, query, key, value, attention_mask, sliding_window, scaling, softcap, forms)
    elif route.inv_freq is not None:
        out = run(0)
    elif route.method.per_query_frequencies:
        out = _per_query(run, groups(offset), route.method.required_train_length(), query, value)
    else:  # frequencies follow each sequence's own current length (cache included)
        parts = groups(offset + key_length)  # each sequence's length: its last position + 1
        if len(parts) == 1:
            out = run(parts[0][1])
        else:
            out = query.new_empty(query.shape[:3] + value.shape[-1:])
            for rows, length in parts:
                out[rows] = run(length, rows)
    if attention_mask is not None:
        # Padding queries sit at negative positions under left padding, where log-n's
        # ln(p + 1) is NaN; their output is never used, but a NaN there would reach real
        # rows of the next layer through 0 × NaN in its value product. Zero them.
        out = out.masked_fill(~attention_mask[:, None, -query.shape[2]:, None], 0.0)
    if hole is not None:
        evict.after_call(route.cache(), layer[0], hole, offset)
    route.calls += 1
    return out.transpose(1, 2).contiguous(), None


def _cache_layer(module, route: Route, key, new: int):
    """(layer, key_cache.Visible) of the cache layer that returned `key`, or None without a
    cache or for a layer type key_cache does not read."""
    cache = None if route.cache is None else route.cache()
    if cache is None:
        return None
    return key_cache.visible_keys(cache, getattr(module, "layer_idx", None), key, new)


def _key_forms(route: Route, layer, seen: key_cache.Visible, query, key, offset, step: Step | None) -> dict | None:
    """The rotated forms of every key, kept on the cache layer (patches/key_cache.py), or
    None in lean mode, when the method's forms cannot be cached, or in a prefill into an
    empty cache layer (the forms are built by the next call)."""
    if route.key_cache != "kept" or route.inv_freq is None or not route.method.key_rotations_cacheable:
        return None
    device, T = key.device, query.shape[2]

    def rotate(keys, index: slice):
        if step is not None and step.key_rows is not None and index.stop == key.shape[2] and \
                index.stop - index.start == T:  # the step's new keys: at its query positions
            return {name: rows.rotate(keys) for name, rows in step.key_rows.items()}
        positions = torch.arange(index.start, index.stop, device=device)[None, :] + offset[:, None]
        return rotate_key_forms(route.method, route.inv_freq, route.attention_factor, route.layout, keys, positions)

    return key_cache.key_forms_for(layer, seen, key, query.shape[2], rotate)


def _key_offset(positions: torch.Tensor, batch: int, key_length: int, device) -> torch.Tensor:
    """(B,) position of key index 0: the queries are the last keys, so the last query's
    position minus key_length - 1."""
    last = positions[:, -1].to(device=device, dtype=torch.long).expand(batch)
    return last - (key_length - 1)


def _share(route: Route) -> int:
    """The route's sharing token: equal for routes with equal method, layout, frequencies and
    attention factor (every layer holds its own copy of the frequencies)."""
    if route.share is None:
        freq = route.inv_freq.detach().to(device="cpu", dtype=torch.float64).numpy().tobytes()
        signature = (route.method, route.layout, freq, route.attention_factor)
        try:
            route.share = _SHARED.setdefault(signature, next(_TOKENS))
        except TypeError:  # a method with an unhashable field: this route shares with no other
            route.share = next(_TOKENS)
        if len(_SHARED) > 1024:  # tokens are never reused, so forgetting costs only sharing
            _SHARED.clear()
    return route.share


def _step(route: Route, positions, query, key, value, attention_mask, sliding_window, scaling,
          softcap) -> Step | None:
    """The decoding step this call belongs to (made by the step's first layer), or None when
    its layers share nothing: frequencies that follow a length, more than STEP_ROWS query
    rows, or tensors off the CPU (reading the positions there would synchronise)."""
    T = query.shape[2]
    if route.inv_freq is None or T > STEP_ROWS or query.device.type != "cpu" or positions.device.type != "cpu":
        return None
    last = positions[:, -1]
    found = (_share(route), route.key_cache, tuple(query.shape), tuple(key.shape), value.shape[-1], query.dtype,
             tuple(last.tolist()), sliding_window, scaling, softcap, attention_mask is None)
    steps = route.positions.steps
    step = steps.get(found)
    if step is not None:
        if attention_mask is None or torch.equal(step.mask, attention_mask):
            return step
        return None  # another padding of the same shapes: this call plans for itself
    S = key.shape[2]
    offset = _key_offset(positions, query.shape[0], S, query.device)
    rows = None
    if route.key_cache == "kept" and route.method.key_rotations_cacheable:
        new = offset[:, None] + torch.arange(S - T, S)  # the new keys: the last T, at the queries' positions
        rows = {name: Rows.of(cos, sin, route.layout) for name, (cos, sin) in
                key_form_rows(route.method, route.inv_freq, route.attention_factor, new, query.dtype).items()}
    step = steps[found] = Step(offset, rows, attention_mask)
    while len(steps) > STEPS_KEPT:
        steps.pop(next(iter(steps)), None)
    return step


def _run_step(step: Step, route: Route, query, key, value, attention_mask, sliding_window, scaling, softcap,
              forms) -> torch.Tensor:
    """Attention of one layer of a step: the step's plan on this layer's tensors, or, for the
    step's first layer, a plan built (and validated) here and kept for the others."""
    from ..attention import run_plan

    if step.plan is not None:
        return run_plan(step.plan.on(query, key, value, forms))
    plan = build_plan(query, key, value, route.method, route.inv_freq, attention_factor=route.attention_factor,
                      layout=route.layout, position_offset=step.offset, key_padding_mask=attention_mask,
                      sliding_window=sliding_window, scale=scaling, softcap=softcap, key_forms=forms)
    step.plan = step_plan(plan)
    return run_plan(plan)


def capture_cache(attention: nn.Module, route: Route):
    """(do, undo) installing a forward pre-hook that hands `attention`'s KV cache to `route`."""
    handles = []

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        route.cache = None if cache is None else weakref.ref(cache)

    def do():
        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))

    def undo():
        while handles:
            handles.pop().remove()
        route.cache = None

    return do, undo


def _per_query(run, groups, train_length: int, query, value) -> torch.Tensor:
    """Per-query frequencies (dynamic-ntk with per_query=true): the query at position p uses
    the frequencies for length p + 1 over keys 0..p, which is what decoding step p computes.

    Rows with p + 1 ≤ L all have the frequencies of L (dynamic NTK is plain RoPE there), so
    they take one call; each later row takes its own call (T = 1 over its key prefix). A
    prefill therefore costs one call per row beyond L; decoding (T = 1) stays one call.
    """
    T, S = query.shape[2], value.shape[2]
    out = query.new_empty(query.shape[:3] + value.shape[-1:])  # (B, H, T, Dv)
    for rows, offset in groups:  # sequences whose key index 0 sits at `offset`
        first = offset + S - T  # position of query row 0
        shared = min(T, max(0, train_length - first))  # rows with length first + t + 1 ≤ L
        if shared:
            out[rows, :, :shared] = run(train_length, rows, slice(0, shared), slice(0, S - T + shared))
        for t in range(shared, T):
            out[rows, :, t : t + 1] = run(first + t + 1, rows, slice(t, t + 1), slice(0, S - T + t + 1))
    return out


def register() -> None:
    """Register the attention and mask functions under NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, ropelab_attention)
    AttentionMaskInterface.register(NAME, padding_mask)


def identity_rotary_forward(original, positions: PositionState):
    """A rotary forward that records the positions and returns cos = 1, sin = 0 of the
    original's shape and dtype, so `apply_rotary_pos_emb` leaves q and k unrotated."""

    def forward(*args, **kwargs):
        ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        positions.position_ids = ids
        cos, sin = original(*args, **kwargs)
        return torch.ones_like(cos), torch.zeros_like(sin)

    return forward
