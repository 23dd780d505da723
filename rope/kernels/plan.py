"""The plan of one `rotary_attention` call: validated inputs and the parts of the causal
triangle each backend computes (ReRoPE/Leaky ReRoPE: Su, "Transformer升级之路 12/13",
kexue.fm/archives/9708 and 9728; SelfExtend: Jin et al. 2024, arXiv 2401.01325; DCA,
STRING, LM-Infinite and attention sinks: the sources in rope/position_maps.py).

A part is a contiguous key range per query row with one rotation of queries and keys
(query/key position maps and a frequency divisor). Two shapes:

* a distance band lo ≤ r = i - j < hi, the same for every row and sequence: the near
  part (ordinary RoPE), the far part of a relative map, STRING's bands, the recent/local
  windows of sinks and LM-Infinite. Backends compute bands without any mask or per-row data;
* a general range [starts[b, t], stops[b, t]) of key indices per sequence b and query row t
  (`Part.ranges`, (B, rows) int64 each, causality, the sliding window and key index ≥ 0
  already applied): DCA's chunk-aligned parts, the sink and global key prefixes. They are
  O(B·T) numbers; no T×S matrix is built.

The parts of a plan are disjoint and together hold every visible pair, so the attention over
all of them is the merge of each part's attention by its row log-sum-exp (kernels/merge.py).

A plan is immutable and holds the *unrotated* inputs plus, per part, how to rotate them;
backends rotate a part's queries and keys only when they reach it (`rotated_queries`,
`rotated_keys`), so one part's copies can be freed before the next part's are built.
Keys whose rotated form depends only on their own position can be handed in already
rotated (`key_forms`, from `rotate_key_forms`, one per `Rotation.key_form` name): a
decoding step then rotates only its new query rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass

import torch

from ..method import Method
from ..rotary import LAYOUTS
from .tables import Rows, cos_sin_rows, frequencies_on, rotate, rotate_rows

__all__ = ["Part", "Plan", "Rotation", "StepPlan", "build_plan", "rotations", "rotate_key_forms", "key_form_rows",
           "step_plan"]


def _identity(p: torch.Tensor) -> torch.Tensor:
    return p


@dataclass(frozen=True)
class Rotation:
    """How one part rotates: queries at `query_position(i)`, keys at `key_position(j)` (None:
    keys are used unrotated, ReRoPE's far part, their attention factor moved onto q)."""

    inv_freq: torch.Tensor  # float64 on the inputs' device
    query_position: Callable[[torch.Tensor], torch.Tensor]
    query_factor: float
    key_position: Callable[[torch.Tensor], torch.Tensor] | None
    key_factor: float
    # The name of the rotated copy of the keys this rotation uses (parts rotating keys alike
    # share one); None when keys are used unrotated.
    key_form: str | None = None


def rotations(method: Method, inv_freq: torch.Tensor, attention_factor: float, device) -> dict[str, Rotation]:
    """The rotation of each part the method can have, by part name: "near", and "far" for a
    relative map; the parts of `method.kernel_parts()` for a key-range method."""
    if method.key_range_parts:
        return {spec.name: _spec_rotation(spec, inv_freq, attention_factor, device) for spec in method.kernel_parts()}
    near = Rotation(frequencies_on(inv_freq, device), _identity, attention_factor, _identity, attention_factor, "near")
    rel = method.relative
    if rel is None:
        return {"near": near}
    far_freq = frequencies_on(inv_freq, device, rel.far_freq_divisor)
    if rel.far_keys_rotated:
        far = Rotation(far_freq, rel.far_query_position, attention_factor, rel.far_key_position, attention_factor,
                       "far")
    else:  # every far key at position 0: no rotation; both factors on q
        far = Rotation(far_freq, rel.far_query_position, attention_factor**2, None, 1.0)
    return {"near": near, "far": far}


def _spec_rotation(spec, inv_freq, attention_factor, device) -> Rotation:
    """The rotation of one part of rope/position_parts.py."""
    freq = frequencies_on(inv_freq, device, spec.freq_divisor)
    if spec.key_position is None:  # keys at position 0: unrotated, both factors on q
        return Rotation(freq, spec.query_position, attention_factor**2, None, 1.0)
    return Rotation(freq, spec.query_position, attention_factor, spec.key_position, attention_factor, spec.key_form)


def rotate_key_forms(method: Method, inv_freq: torch.Tensor, attention_factor: float, layout: str,
                     key: torch.Tensor, positions: torch.Tensor, tables: bool = True) -> dict[str, torch.Tensor]:
    """The rotated forms of keys (B, Hkv, n, D) at positions (B, n) that `rotary_attention`
    takes as `key_forms`: one per key form name of the method's parts ("near"; "far" for
    Leaky ReRoPE and SelfExtend, not ReRoPE, whose far keys are the raw keys; "chunk" for
    DCA; "near" alone for STRING, LM-Infinite and sinks).

    Valid only for a method whose key rotations depend on the key's own position alone
    (`method.key_rotations_cacheable`); a length-dependent frequency map is refused.
    `tables=False`: cos/sin computed directly, with no host synchronisation.
    """
    rows = key_form_rows(method, inv_freq, attention_factor, positions, key.dtype, tables)
    return {name: rotate_rows(key, cos, sin, layout, key.dtype) for name, (cos, sin) in rows.items()}


def key_form_rows(method: Method, inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor,
                  dtype: torch.dtype, tables: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos, sin (B, n, d/2) of each key form of `rotate_key_forms` for keys at positions
    (B, n): `rotate_rows(key, cos, sin, layout, dtype)` is that form. Every layer of a
    decoding step rotates its new keys at the same positions, so it looks them up once."""
    if not method.key_rotations_cacheable:
        raise ValueError(f"method={method.spec()!r}: its frequencies follow the sequence length, so a key's "
                         "rotated form changes as the sequence grows and cannot be cached")
    rows = {}
    for rot in rotations(method, inv_freq, attention_factor, positions.device).values():
        if rot.key_form is not None and rot.key_form not in rows:
            rows[rot.key_form] = cos_sin_rows(rot.key_position(positions), rot.inv_freq, rot.key_factor, dtype,
                                              tables)
    return rows


@dataclass(frozen=True)
class Part:
    """Keys of each query row under one rotation: distances lo ≤ i - j < hi (hi None: no upper
    edge) when `ranges` is None, else key indices [starts[b, t], stops[b, t]) for query row
    first_row + t of sequence b. Query rows from `first_row` have keys here; every key they
    can see lies in indices [key_start, key_stop)."""

    name: str
    lo: int
    hi: int | None
    first_row: int
    key_start: int
    key_stop: int
    rotation: Rotation
    cached_keys: torch.Tensor | None  # keys [key_start, key_stop) already rotated, or None
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None  # (starts, stops), (B, T - first_row) each
    # the query rows' cos/sin [first_row, T), looked up once for every layer of a decoding
    # step (`step_plan`), or None: looked up by `rotated_queries`
    query_rows: Rows | None = None

    @property
    def is_band(self) -> bool:
        return self.ranges is None


@dataclass(frozen=True)
class Plan:
    query: torch.Tensor  # (B, H, T, D) unrotated
    key: torch.Tensor  # (B, Hkv, S, D) unrotated
    value: torch.Tensor  # (B, Hkv, S, Dv)
    parts: tuple[Part, ...]
    layout: str
    query_positions: torch.Tensor  # (B, T) int64
    key_positions: torch.Tensor  # (B, S) int64
    row_scale: torch.Tensor | None  # (B, T) float64 log-n multipliers, or None
    key_padding_mask: torch.Tensor | None  # (B, S) bool, True = real; None when nothing is padded
    sliding_window: int | None  # None when it hides nothing
    scale: float
    softcap: float | None

    @property
    def q_first(self) -> int:
        """Key index of query row 0 (the queries are the last T keys)."""
        return self.key.shape[2] - self.query.shape[2]

    def rotated_queries(self, part: Part, tables: bool = True) -> torch.Tensor:
        """The part's query rows [first_row, T), rotated (and log-n scaled). `tables=False`:
        cos/sin computed directly, no host synchronisation (kernels/tables.py)."""
        rot, t0 = part.rotation, part.first_row
        row_scale = None if self.row_scale is None else self.row_scale[:, t0:]
        if part.query_rows is not None:
            return part.query_rows.rotate(self.query[:, :, t0:], row_scale)
        return rotate(self.query[:, :, t0:], rot.query_position(self.query_positions[:, t0:]), rot.inv_freq,
                      rot.query_factor, self.layout, self.query.dtype, row_scale, tables)

    def rotated_keys(self, part: Part, tables: bool = True) -> torch.Tensor:
        """The part's keys [key_start, key_stop): cached, raw (ReRoPE's far part) or rotated now."""
        if part.cached_keys is not None:
            return part.cached_keys
        keys = self.key[:, :, part.key_start : part.key_stop]
        rot = part.rotation
        if rot.key_position is None:
            return keys
        positions = rot.key_position(self.key_positions[:, part.key_start : part.key_stop])
        return rotate(keys, positions, rot.inv_freq, rot.key_factor, self.layout, self.query.dtype, tables=tables)


@dataclass(frozen=True)
class StepPlan:
    """A plan without its query, key and value: what every layer of one decoding step shares
    (positions, parts, the query rows' cos/sin), made by `step_plan` from the first layer's
    plan. `on` puts another layer's tensors of the same shapes into it, so that layer's plan
    costs no validation, no cutting into parts and no table look-up; the numbers are those
    `build_plan` would give it."""

    template: Plan  # query, key and value as meta tensors (their shapes and dtype); parts hold no keys
    device: torch.device

    def on(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           key_forms: Mapping[str, torch.Tensor] | None = None) -> Plan:
        """The plan of another layer of the step: its unrotated query, key and value, and
        its keys' rotated forms (as `build_plan` takes them) or None."""
        t = self.template
        for name, x, like in (("query", query, t.query), ("key", key, t.key), ("value", value, t.value)):
            if x.shape != like.shape or x.dtype != like.dtype or x.device != self.device:
                raise _err(f"{name}.shape", tuple(x.shape), f"must be shaped, typed and placed like the step's "
                                                            f"{tuple(like.shape)} {like.dtype} on {self.device}")
        parts = t.parts
        if key_forms is not None:
            parts = tuple(part if part.rotation.key_form is None else
                          dataclasses.replace(part, cached_keys=_form(key_forms, part, key)) for part in parts)
        return dataclasses.replace(t, query=query, key=key, value=value, parts=parts)


def _form(key_forms: Mapping[str, torch.Tensor], part: Part, key: torch.Tensor) -> torch.Tensor:
    name = part.rotation.key_form
    form = key_forms.get(name)
    if not isinstance(form, torch.Tensor) or form.shape != key.shape or form.dtype != key.dtype \
            or form.device != key.device:
        raise _err(f"key_forms[{name!r}]", getattr(form, "shape", form),
                   f"must be a tensor shaped, typed and placed like key {tuple(key.shape)}")
    return form[:, :, part.key_start : part.key_stop]


def step_plan(plan: Plan) -> StepPlan:
    """`plan` without its tensors, its query rows' cos/sin looked up (in the query's dtype,
    as `Plan.rotated_queries` would), to be put on every other layer of the step (`StepPlan.on`)."""

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    parts = []
    for part in plan.parts:
        rot, t0 = part.rotation, part.first_row
        cos, sin = cos_sin_rows(rot.query_position(plan.query_positions[:, t0:]), rot.inv_freq, rot.query_factor,
                                plan.query.dtype)
        parts.append(dataclasses.replace(part, cached_keys=None, query_rows=Rows.of(cos, sin, plan.layout)))
    template = dataclasses.replace(plan, query=meta(plan.query), key=meta(plan.key), value=meta(plan.value),
                                   parts=tuple(parts))
    return StepPlan(template, plan.query.device)


def _err(field: str, value, rule: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {rule}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def build_plan(query, key, value, method, inv_freq, *, attention_factor=1.0, layout="half", position_offset=None,
               key_padding_mask=None, sliding_window=None, scale=None, softcap=None,
               key_forms: Mapping[str, torch.Tensor] | None = None) -> Plan:
    """Validate `rotary_attention`'s arguments (a ValueError naming the field, the value and
    the rule) and cut the causal triangle into parts."""
    offsets = _validate(query, key, value, method, inv_freq, attention_factor, layout, position_offset,
                        key_padding_mask, sliding_window, scale, softcap)
    B, H, T, D = query.shape
    S = key.shape[2]
    device = query.device
    scale = float(D**-0.5 if scale is None else scale)
    rots = rotations(method, inv_freq, attention_factor, device)
    _check_forms(key_forms, rots, key)

    rel = method.relative
    sw = sliding_window if sliding_window is not None and sliding_window < S else None
    w = rel.window if rel is not None and rel.window < S else None  # w ≥ S: no far pair exists
    near_hi = min(x for x in (w, sw) if x is not None) if (w or sw) else None
    has_far = w is not None and (sw is None or sw > w)

    q_first = S - T
    key_pos = torch.arange(S, device=device, dtype=torch.int64)[None, :] + offsets[:, None]  # (B, S)
    query_pos = key_pos[:, q_first:]
    # Positions below 0 are left padding; log-n of them would be NaN (log of a negative),
    # and a NaN in a padded row poisons real rows of the next layer through 0·NaN.
    row_scale = method.query_scale(query_pos.clamp(min=0))  # (B, T) float64 or None
    if key_padding_mask is not None and device.type == "cpu" and bool(key_padding_mask.all()):
        key_padding_mask = None  # (elsewhere that test would cost a host synchronisation)

    def cached(form, a, b):
        return None if key_forms is None or form not in key_forms else key_forms[form][:, :, a:b]

    if method.key_range_parts:
        parts = _range_method_parts(method, rots, T, S, sw, query_pos, offsets, cached)
        return Plan(query, key, value, tuple(parts), layout, query_pos, key_pos, row_scale, key_padding_mask, sw,
                    scale, None if softcap is None else float(softcap))

    # Near part: only keys within near_hi of some query (decoding: the last near_hi).
    kn0 = 0 if near_hi is None else max(0, q_first - near_hi + 1)
    parts = [Part("near", 0, near_hi, 0, kn0, S, rots["near"], cached("near", kn0, S))]
    if has_far:  # rows with i ≥ w (from tf0), keys j ≤ S-1-w (and within the sliding window)
        tf0 = max(0, w - q_first)
        kf0 = 0 if sw is None else max(0, q_first + tf0 - sw + 1)
        far = rots["far"]
        parts.append(Part("far", w, sw, tf0, kf0, S - w, far, cached(far.key_form, kf0, S - w)))
    return Plan(query, key, value, tuple(parts), layout, query_pos, key_pos, row_scale, key_padding_mask, sw,
                scale, None if softcap is None else float(softcap))


def _range_method_parts(method, rots, T, S, sw, query_pos, offsets, cached) -> list[Part]:
    """The parts of a key-range method (rope/position_parts.py) on this call's keys: bands
    as bands (cut by the sliding window), other parts as per-row key index ranges. Parts
    that hold no pair are left out; on the CPU the rows and keys a range part can reach are
    found exactly, elsewhere (where that would synchronise with the host) it spans them all."""
    q_first = S - T
    device = query_pos.device
    parts = []
    for spec in method.kernel_parts():
        rot = rots[spec.name]
        if spec.band is not None:
            lo, hi = spec.band
            edges = [x for x in (hi, sw) if x is not None]
            hi = min(edges) if edges else None
            if lo >= S or (hi is not None and hi <= lo):
                continue  # no pair at these distances
            if hi is not None and hi >= S:
                hi = None
            first = max(0, lo - q_first)
            k0 = 0 if hi is None else max(0, q_first + first - hi + 1)
            parts.append(Part(spec.name, lo, hi, first, k0, S - lo, rot, cached(rot.key_form, k0, S - lo)))
            continue
        row = torch.arange(q_first, S, device=device)[None, :]  # key index of each query row
        starts = spec.key_start(query_pos) - offsets[:, None]  # text positions -> key indices
        stops = torch.minimum(spec.key_stop(query_pos) - offsets[:, None], row + 1)
        starts = starts.clamp(min=0) if sw is None else torch.maximum(starts.clamp(min=0), row - sw + 1)
        stops = torch.maximum(stops, starts)  # an empty range stays empty
        first, k0, k1 = 0, 0, S
        if device.type == "cpu":  # reading CPU numbers costs no synchronisation
            filled = stops > starts
            rows = filled.any(0).nonzero()
            if rows.numel() == 0:
                continue
            first = int(rows[0])
            k0 = int(starts.masked_fill(~filled, S).min())
            k1 = int(stops.max())
        parts.append(Part(spec.name, 0, None, first, k0, k1, rot, cached(rot.key_form, k0, k1),
                          (starts[:, first:], stops[:, first:])))
    return parts


def _check_forms(key_forms, rots, key) -> None:
    if key_forms is None:
        return
    if not isinstance(key_forms, Mapping):
        raise _err("key_forms", type(key_forms).__name__, "must be None or a mapping part name -> rotated keys")
    wanted = {rot.key_form for rot in rots.values() if rot.key_form is not None}
    if set(key_forms) != wanted:
        raise _err("key_forms", sorted(key_forms), f"must hold exactly the forms {sorted(wanted)} (rotate_key_forms)")
    for name, form in key_forms.items():
        if not isinstance(form, torch.Tensor) or form.shape != key.shape or form.dtype != key.dtype \
                or form.device != key.device:
            raise _err(f"key_forms[{name!r}]", getattr(form, "shape", form),
                       f"must be a tensor shaped, typed and placed like key {tuple(key.shape)}")


def _validate(query, key, value, method, inv_freq, attention_factor, layout, position_offset,
              key_padding_mask, sliding_window, scale, softcap):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise _err(name, type(t).__name__, "must be a torch.Tensor")
        if t.dim() != 4:
            raise _err(f"{name}.shape", tuple(t.shape), "must be 4-D (batch, heads, length, head_dim)")
        if not t.is_floating_point():
            raise _err(f"{name}.dtype", t.dtype, "must be a floating-point dtype")
    B, H, T, D = query.shape
    _, Hkv, S, Dk = key.shape
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise _err(f"{name}.dtype", t.dtype, f"must equal query.dtype={query.dtype}")
        if t.device != query.device:
            raise _err(f"{name}.device", str(t.device), f"must equal query.device={query.device}")
        if t.shape[0] != B:
            raise _err(f"{name}.shape[0]", t.shape[0], f"batch must equal query.shape[0]={B}")
    if Dk != D:
        raise _err("key.shape[3]", Dk, f"head_dim must equal query.shape[3]={D}")
    if tuple(value.shape[1:3]) != (Hkv, S):
        raise _err("value.shape", tuple(value.shape), f"heads and length must match key.shape={tuple(key.shape)}")
    if Hkv == 0 or H % Hkv:
        raise _err("key.shape[1]", Hkv, f"query heads H={H} must be a multiple of the key/value heads")
    if T > S:
        raise _err("query.shape[2]", T, f"must be <= key length S={S} (queries are the last T keys)")
    if not isinstance(method, Method):
        raise _err("method", method, "must be a ropelab method (ropelab.get_method(...))")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise _err("inv_freq", getattr(inv_freq, "shape", inv_freq), "must be a non-empty 1-D tensor (rotary_dim/2,)")
    if 2 * inv_freq.numel() > D:
        raise _err("inv_freq.shape", tuple(inv_freq.shape), f"rotary_dim = 2*{inv_freq.numel()} exceeds head_dim={D}")
    if not _is_number(attention_factor) or not math.isfinite(attention_factor) or attention_factor <= 0:
        raise _err("attention_factor", attention_factor, "must be a finite number > 0")
    if layout not in LAYOUTS:
        raise _err("layout", layout, f"must be one of {LAYOUTS}")
    if position_offset is None:
        offsets = torch.zeros(B, dtype=torch.int64, device=query.device)
    elif isinstance(position_offset, int) and not isinstance(position_offset, bool):
        offsets = torch.full((B,), position_offset, dtype=torch.int64, device=query.device)
    elif isinstance(position_offset, torch.Tensor):
        dt = position_offset.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise _err("position_offset.dtype", position_offset.dtype, "must be an integer dtype")
        if position_offset.dim() == 0:
            position_offset = position_offset.expand(B)
        if tuple(position_offset.shape) != (B,):
            raise _err("position_offset.shape", tuple(position_offset.shape),
                       f"must be ({B},) (one offset per sequence)")
        offsets = position_offset.to(device=query.device, dtype=torch.int64)
    else:
        raise _err("position_offset", position_offset, "must be None, an int or a (B,) integer tensor")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise _err("key_padding_mask", getattr(key_padding_mask, "dtype", key_padding_mask),
                       "must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise _err("key_padding_mask.shape", tuple(key_padding_mask.shape), f"must be (B, S) = ({B}, {S})")
    if sliding_window is not None and (
        not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1
    ):
        raise _err("sliding_window", sliding_window, "must be None or an integer >= 1")
    if scale is not None and (not _is_number(scale) or not math.isfinite(scale) or scale <= 0):
        raise _err("scale", scale, "must be None or a finite number > 0")
    if softcap is not None and (not _is_number(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise _err("softcap", softcap, "must be None or a finite number > 0")
    return offsets
