"""The registered key-range methods (dca, string, lm-infinite, sinks) through
`rotary_attention`, against the float64 maps of rope/position_maps.py
(`reference_attention`, itself checked against the authors' decoding loops in
test_position_maps.py).

What is asserted:
- every backend that runs on the CPU (cpu, eager, flex in eager mode) equals the float64
  oracle with grouped-query heads, under left padding, with a sliding window and with
  soft-capping (cpu takes soft-capping only for one row, as for every method);
- cached decoding (one or a few new rows against keys rotated once by `rotate_key_forms`)
  equals the prefill's rows;
- the CPU backend's row blocks (cut at chunk edges, at most `chunk_max_rows` rows) give the
  same result when forced small;
- parameters at or past the sequence reduce to plain RoPE (the kernel's output equals the
  `rope` method's), one past the boundary they do not;
- flash-attn refuses key-range parts with the reason; bad parameters name field, value and
  rule; the authors' defaults follow the training length.

Tolerance: float32 inputs and kernels against float64, as tests/rope/test_attention.py: a
few 1e-7 of rounding on O(1) outputs; 1e-5 leaves margin while a key in the wrong part or
a position one off moves outputs by 1e-2 or more. Plain-RoPE reductions compare two float32
kernels that sum in different orders: the same 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import ropelab
from ropelab.attention import rotary_attention, rotate_key_forms
from ropelab.kernels import cpu
from ropelab.position_maps import reference_attention

TOL = 1e-5
D = 16
INV_FREQ = 1e4 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

# Small parameters that exercise every part within 40 tokens (as test_position_maps.py).
SPECS = {
    "dca": {"chunk_size": 9, "local_window": 3},
    "string": {"shift": 7, "local_window": 2},
    "lm-infinite": {"n_global": 3, "n_local": 6},
    "sinks": {"sinks": 2, "window": 5},
}
NAMES = list(SPECS)


def inputs(B=2, H=4, Hkv=2, T=40, S=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return q, k, v


def method(name, **extra):
    return ropelab.get_method(name, **SPECS[name], **extra)


def factor(m) -> float:
    """The method's own attention factor (STRING's on cos and sin; 1 for the others)."""
    return m.frequencies(D, 1e4).attention_factor


def oracle(name, q, k, v, m, **kw):
    params = {**SPECS[name], **({"attention_factor": m.attention_factor} if name == "string" else {})}
    return reference_attention(q, k, v, name, params, INV_FREQ, **kw)


def padding(S, pads=(0, 5)):
    pads = torch.tensor(pads)
    return -pads, torch.arange(S)[None, :] >= pads[:, None]


OPTIONS = {
    "plain": {},
    "left-padding": "pad",
    "sliding-window": {"sliding_window": 11},
    "softcap": {"softcap": 5.0},
}


def _options(label, S):
    if label == "left-padding":
        offset, mask = padding(S)
        return {"position_offset": offset, "key_padding_mask": mask}, mask
    return dict(OPTIONS[label]), None


def _close(out, ref, mask, T):
    err = out.double() - ref
    if mask is not None:  # padded query rows are not real tokens
        err = err.masked_fill(~mask[:, None, -T:, None], 0.0)
    assert float(err.abs().max()) <= TOL


# The CPU flash kernel cannot cap logits: soft-capped prefill takes eager (auto does so).
PREFILL_CASES = [(label, backend) for label in OPTIONS for backend in ("cpu", "eager", "flex")
                 if not (backend == "cpu" and label == "softcap")]


@pytest.mark.parametrize("label,backend", PREFILL_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_the_float64_map(name, label, backend):
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")  # torch < 2.5 has none
    q, k, v = inputs()
    kw, mask = _options(label, 40)
    m = method(name)
    out = rotary_attention(q, k, v, m, INV_FREQ, attention_factor=factor(m), backend=backend, **kw)
    _close(out, oracle(name, q, k, v, m, **kw), mask, 40)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("label", list(OPTIONS))
@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_prefill(name, label, rows):
    """Each step: `rows` new queries against every key so far, the keys rotated once
    (rotate_key_forms) as a KV cache keeps them; backend auto (cpu, or eager for capped rows)."""
    q, k, v = inputs()
    S = 40
    kw, mask = _options(label, S)
    m = method(name)
    af = factor(m)
    prefill = rotary_attention(q, k, v, m, INV_FREQ, attention_factor=af, **kw)
    offset = kw.get("position_offset", torch.zeros(2, dtype=torch.int64))
    positions = torch.arange(S)[None, :] + offset[:, None]
    forms = rotate_key_forms(m, INV_FREQ, af, "half", k, positions)
    assert set(forms) == ({"chunk"} if name == "dca" else {"near"})
    for end in range(20, S + 1, rows):
        step = {**kw}
        if mask is not None:
            step["key_padding_mask"] = mask[:, :end]
        out = rotary_attention(q[:, :, end - rows : end], k[:, :, :end], v[:, :, :end], m, INV_FREQ,
                               attention_factor=af, key_forms={n: f[:, :, :end] for n, f in forms.items()}, **step)
        err = out - prefill[:, :, end - rows : end]
        if mask is not None:
            err = err.masked_fill(~mask[:, None, end - rows : end, None], 0.0)
        assert float(err.abs().max()) <= TOL, end


@pytest.mark.parametrize("name", NAMES)
def test_cpu_row_blocks_forced_small(name, monkeypatch):
    """Blocks of 4 rows cut DCA's chunks (stride 6) and the prefix parts mid-way: every block
    shape (rectangle, rectangle + triangle, masked) is taken, with and without padding."""
    monkeypatch.setattr(cpu.BAND, "chunk_max_rows", 4)
    q, k, v = inputs(seed=3)
    m = method(name)
    for label in ("plain", "left-padding"):
        kw, mask = _options(label, 40)
        out = rotary_attention(q, k, v, m, INV_FREQ, attention_factor=factor(m), backend="cpu", **kw)
        _close(out, oracle(name, q, k, v, m, **kw), mask, 40)


# (name, params at the boundary where every pair among 40 tokens is plain RoPE, params one past it)
REDUCTIONS = [
    ("dca", {"chunk_size": 39, "local_window": 3}, {"chunk_size": 38, "local_window": 3}),
    ("string", {"shift": 40, "local_window": 2, "attention_factor": 1.0},
     {"shift": 39, "local_window": 2, "attention_factor": 1.0}),
    ("lm-infinite", {"n_global": 0, "n_local": 40}, {"n_global": 0, "n_local": 39}),
    ("sinks", {"sinks": 2, "window": 37}, {"sinks": 2, "window": 36}),
]


@pytest.mark.parametrize("name,at,past", REDUCTIONS)
def test_parameters_at_the_sequence_reduce_to_rope(name, at, past):
    q, k, v = inputs(seed=5)
    rope = rotary_attention(q, k, v, ropelab.get_method("rope"), INV_FREQ)
    same = rotary_attention(q, k, v, ropelab.get_method(name, **at), INV_FREQ)
    other = rotary_attention(q, k, v, ropelab.get_method(name, **past), INV_FREQ)
    assert float((same - rope).abs().max()) <= TOL
    assert float((other - rope).abs().max()) > 1e-3  # the boundary is where the text says


def test_sinks_window_past_the_sequence_leaves_no_sink_part():
    from ropelab.kernels.plan import build_plan

    q, k, v = inputs()
    plan = build_plan(q, k, v, ropelab.get_method("sinks", sinks=4, window=60), INV_FREQ)
    assert [p.name for p in plan.parts] == ["recent"] and plan.parts[0].hi is None


def test_dca_parts_are_chunk_aligned_key_ranges():
    from ropelab.kernels.plan import build_plan

    q, k, v = inputs(B=1)
    plan = build_plan(q, k, v, method("dca"), INV_FREQ)  # stride 6
    intra, succ, inter = plan.parts
    assert (intra.first_row, succ.first_row, inter.first_row) == (0, 6, 12)
    starts, stops = succ.ranges
    assert starts[0, :7].tolist() == [0] * 6 + [6] and stops[0, :7].tolist() == [6] * 6 + [12]
    assert not any(p.is_band for p in plan.parts)


def test_flash_attn_refuses_key_ranges_with_the_reason():
    from ropelab.kernels import flash_attn
    from ropelab.kernels.plan import build_plan

    q, k, v = inputs()
    plan = build_plan(q, k, v, method("sinks"), INV_FREQ)
    assert not flash_attn.usable(plan)
    with pytest.raises(ValueError, match=r"backend='flash-attn': parts \['sink'\] have a key range per query row"):
        rotary_attention(q, k, v, method("sinks"), INV_FREQ, backend="flash-attn")


def test_string_bands_would_run_on_flash_attn():
    """STRING is two distance bands: nothing in its plan keeps it off flash-attn."""
    from ropelab.kernels.plan import build_plan

    q, k, v = inputs()
    plan = build_plan(q, k, v, method("string"), INV_FREQ)
    assert [(p.name, p.lo, p.hi) for p in plan.parts] == [("near", 0, 7), ("shifted", 7, None)]
    assert all(p.is_band for p in plan.parts)


@pytest.mark.parametrize("spec,message", [
    ("sinks:sinks=10,window=5", r"^sinks=10: must be <= window=5"),
    ("sinks:window=0", r"^window=0: must be an integer >= 1"),
    ("sinks:window=2.5", r"^window=2.5: must be an integer >= 1"),
    ("dca:chunk_size=10,local_window=5", r"^local_window=5: must be < chunk_size - local_window"),
    ("string:shift=4,local_window=5", r"^local_window=5: must be <= shift=4"),
    ("string:attention_factor=-1", r"^attention_factor=-1: must be a finite number > 0"),
    ("lm-infinite:n_global=-1", r"^n_global=-1: must be an integer >= 0"),
    ("sinks:window=8190,train_length=8192", r"^window=8190: sinks \+ window = 8194 must be <= train_length=8192"),
    ("dca:chunk_size=8192,train_length=8192", r"^chunk_size=8192: must be < train_length=8192"),
    ("lm-infinite:n_local=9000,train_length=8192", r"^n_local=9000: must be <= train_length=8192"),
])
def test_bad_parameters_name_field_value_and_rule(spec, message):
    with pytest.raises(ValueError, match=message):
        ropelab.parse_method(spec)


def test_partial_parameters_are_checked_once_the_training_length_is_known():
    m = ropelab.parse_method("sinks:sinks=3000")  # the window (L - 4 or 2000) is not known yet
    with pytest.raises(ValueError, match=r"^sinks=3000: must be <= window=2000"):
        m.with_train_length(8192)


@pytest.mark.parametrize("name,expected", [
    ("dca", {"chunk_size": 6144, "local_window": 1024}),
    ("string", {"shift": 2703, "local_window": 128, "attention_factor": 0.1 * 0.6931471805599453 + 1}),
    ("lm-infinite", {"n_global": 10, "n_local": 8192}),
    ("sinks", {"sinks": 4, "window": 2000}),
])
def test_authors_defaults_follow_the_training_length(name, expected):
    m = ropelab.get_method(name)
    with pytest.raises(ValueError, match=r"^train_length=None: method .* needs the model's training length"):
        m.map_params()
    filled = m.with_train_length(8192)
    assert filled.map_params() == pytest.approx(expected)
    assert filled.needs_attention_route and filled.key_range_parts and filled.key_rotations_cacheable
    assert ropelab.parse_method(filled.spec()) == filled


def test_key_forms_of_dca_are_validated():
    q, k, v = inputs(T=1)
    with pytest.raises(ValueError, match=r"^key_forms=\['near'\]: must hold exactly the forms \['chunk'\]"):
        rotary_attention(q, k, v, method("dca"), INV_FREQ, key_forms={"near": k})


def test_length_dependent_frequencies_under_a_key_range_method_are_not_cached():
    m = ropelab.parse_method("sinks:sinks=2,window=5,frequency_method=dynamic-ntk(scale=2)")
    assert not m.key_rotations_cacheable
    q, k, v = inputs()
    with pytest.raises(ValueError, match="cannot be cached"):
        rotate_key_forms(m.with_train_length(32), INV_FREQ, 1.0, "half", k, torch.arange(40)[None])
