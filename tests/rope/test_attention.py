"""rotary_attention against a brute-force float64 reference.

The reference builds the full T×S logit matrices the way docs/methods.md states
the methods (near: q at i, k at j; far: q at far_query_position(i), k at
far_key_position(j), frequencies / far_freq_divisor; chosen elementwise by r = i - j),
then masks, soft-caps and takes the softmax. The kernel never forms those matrices, so
agreement checks the band/far split, the block edges and the log-sum-exp merge.

Tolerance: inputs are float32 and the kernel accumulates in float32; with unit-variance
inputs the logits are O(1) and the outputs O(1), so float32 rounding leaves errors of a
few 1e-7 (measured ≤ 1.3e-6 with log-n and an attention factor). 1e-5 is float32 noise
with margin; an indexing mistake (a key one position off, a row in the wrong part)
moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ropelab
from ropelab.attention import merge_by_lse, rotary_attention
from ropelab.rotary import apply_rotary, cos_sin

TOL = 1e-5
BASE = 1e4


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------


def reference(q, k, v, method, inv_freq, *, attention_factor=1.0, layout="half", position_offset=None,
              key_padding_mask=None, sliding_window=None, scale=None, softcap=None):
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    offsets = torch.as_tensor(0 if position_offset is None else position_offset).expand(B)
    kpos = torch.arange(S)[None] + offsets[:, None]  # (B, S)
    qpos = kpos[:, S - T :]

    def rot(x, pos, freq):
        c, s = cos_sin(pos, freq, attention_factor, layout, torch.float64)
        return apply_rotary(x, c[:, None], s[:, None], layout)

    qs = method.query_scale(qpos.clamp(min=0))  # padded rows (negative positions) unscaled
    if qs is not None:
        q = q * qs[:, None, :, None]
    logits = rot(q, qpos, inv_freq) @ rot(k, kpos, inv_freq).transpose(-1, -2)
    r = torch.arange(S - T, S)[:, None] - torch.arange(S)[None, :]
    rel = method.relative
    if rel is not None:
        freq = inv_freq.double() / rel.far_freq_divisor
        far = rot(q, rel.far_query_position(qpos), freq) @ rot(k, rel.far_key_position(kpos), freq).transpose(-1, -2)
        logits = torch.where(r >= rel.window, far, logits)
    logits = logits * (D**-0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    hide = r < 0
    if sliding_window is not None:
        hide = hide | (r >= sliding_window)
    hide = hide[None, None]
    if key_padding_mask is not None:
        hide = hide | ~key_padding_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(hide, -math.inf), -1).nan_to_num(0.0)
    return probs @ v


def inputs(B=2, H=4, Hkv=2, T=37, S=37, D=16, Dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Dv or D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def freqs(method, dim, S):
    f = method.frequencies(dim, BASE, S)
    return f.inv_freq, f.attention_factor


def check(method, *, B=2, H=4, Hkv=2, T=37, S=37, D=16, rotary_dim=None, Dv=None, seed=0, **kw):
    q, k, v = inputs(B, H, Hkv, T, S, D, Dv, seed)
    inv_freq, factor = freqs(method, rotary_dim or D, S)
    kw.setdefault("attention_factor", factor)
    out = rotary_attention(q, k, v, method, inv_freq, **kw)
    ref = reference(q, k, v, method, inv_freq, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g}"
    return out


def left_padding(B, S, pads):
    """Key padding mask and per-sequence offsets for left padding by `pads` tokens."""
    pads = torch.tensor(pads)
    mask = torch.arange(S)[None, :] >= pads[:, None]
    return mask, -pads


M = ropelab.get_method
METHODS = {
    "rope": lambda: M("rope"),
    "rerope": lambda: M("rerope", window=5),
    "leaky": lambda: M("leaky-rerope", window=5, scale=4),
    "self-extend": lambda: M("self-extend", window=6, group=3),
}


# --------------------------------------------------------------------------------------
# each method against the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_prefill_matches_reference(name):
    check(METHODS[name]())


@pytest.mark.parametrize("name", METHODS)
def test_grouped_query_partial_rotary_interleaved(name):
    check(METHODS[name](), B=3, H=6, Hkv=2, D=16, rotary_dim=8, layout="interleaved")
    check(METHODS[name](), B=1, H=3, Hkv=3, D=16, rotary_dim=10, layout="half")


@pytest.mark.parametrize("name", METHODS)
def test_left_padding_with_offsets(name):
    mask, offsets = left_padding(3, 37, [0, 4, 11])
    check(METHODS[name](), B=3, key_padding_mask=mask, position_offset=offsets)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [1, 3, 20])
def test_decoding_against_a_cache(name, T):
    check(METHODS[name](), T=T, S=41)
    mask, offsets = left_padding(2, 41, [0, 9])
    check(METHODS[name](), T=T, S=41, key_padding_mask=mask, position_offset=offsets)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("sliding_window", [1, 3, 8, 20, 100])
def test_sliding_window(name, sliding_window):
    # below, at and above the relative window (5 or 6), and wider than the sequence
    check(METHODS[name](), sliding_window=sliding_window)
    check(METHODS[name](), T=2, S=30, sliding_window=sliding_window)


@pytest.mark.parametrize("name", METHODS)
def test_softcap(name):
    check(METHODS[name](), softcap=1.5)
    mask, offsets = left_padding(2, 37, [0, 6])
    check(METHODS[name](), softcap=3.0, sliding_window=9, key_padding_mask=mask, position_offset=offsets)
    check(METHODS[name](), T=1, softcap=3.0)


def test_logn_scales_query_rows():
    # train_length 8: positions ≥ 8 get scale ln(p+1)/ln 8 > 1, in both parts
    for method in (M("rope", logn=True, train_length=8), M("rerope", window=5, logn=True, train_length=8),
                   M("leaky-rerope", window=5, scale=3, logn=True, train_length=8),
                   M("self-extend", window=6, group=3, logn=True, train_length=8)):
        check(method, rotary_dim=8)
        mask, offsets = left_padding(2, 37, [0, 7])
        check(method, T=4, key_padding_mask=mask, position_offset=offsets)


def test_yarn_attention_factor_through_frequency_method():
    yarn = M("yarn", scale=4)
    for method in (M("rerope", window=5, frequency_method=yarn, train_length=16),
                   M("self-extend", window=6, group=2, frequency_method=yarn, train_length=16)):
        inv_freq, factor = freqs(method, 16, 37)
        assert factor > 1.1  # 0.1·ln 4 + 1
        check(method)  # check() passes the method's own attention factor
        check(method, T=2, rotary_dim=8)


def test_attention_factor_and_scale_and_value_dim():
    check(M("rerope", window=4), attention_factor=1.7, scale=0.3)
    check(M("leaky-rerope", window=4, scale=2), Dv=8)
    check(M("self-extend", window=4, group=2), Dv=24, rotary_dim=12)


@pytest.mark.parametrize("name", ["rerope", "leaky", "self-extend"])
def test_window_one(name):
    method = {"rerope": M("rerope", window=1), "leaky": M("leaky-rerope", window=1, scale=5),
              "self-extend": M("self-extend", window=1, group=2)}[name]
    check(method)
    check(method, T=1, S=20)


# --------------------------------------------------------------------------------------
# sizes that cross the kernel's block boundaries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,kw",
    [
        (M("rerope", window=300), {}),  # band of 800 rows: 128-row blocks and a partial one
        (M("leaky-rerope", window=300, scale=8), {"T": 600}),  # chunked prefill, rows start past the window
        (M("self-extend", window=200, group=7), {"sliding_window": 650}),  # far part is a band too
        (M("rope"), {"T": 600}),  # causal with a 500-key rectangle plus a triangle
        (M("rope"), {"sliding_window": 257}),
    ],
    ids=["rerope", "leaky-chunk", "self-extend-sliding", "rope-chunk", "rope-sliding"],
)
def test_block_boundaries(method, kw):
    kw = dict(kw)
    check(method, B=1, H=2, Hkv=1, S=1100, D=16, T=kw.pop("T", 1100), **kw)


@pytest.mark.parametrize("chunked", [True, False], ids=["unmasked-triangles", "masked-blocks"])
def test_both_band_strategies(monkeypatch, chunked):
    from ropelab.kernels import cpu

    monkeypatch.setattr(cpu.BAND, "chunk_min_width", 256 if chunked else 10**9)
    mask, offsets = left_padding(2, 700, [0, 301])
    check(M("rerope", window=260), B=2, H=2, Hkv=1, S=700, T=700, key_padding_mask=mask, position_offset=offsets)
    check(M("self-extend", window=100, group=5), B=1, H=2, Hkv=1, S=700, T=400, sliding_window=390)
    check(M("rope"), B=1, H=2, Hkv=1, S=700, T=300, sliding_window=270)


@pytest.mark.parametrize("rows", [7, 256], ids=["many-chunks", "kernel-tile"])
def test_batched_band_chunks(monkeypatch, rows):
    # The band's whole chunks as one batch per shape (kernels/band.py), a remainder chunk by
    # the per-chunk loop; B = 2 without padding (one batched pass per sequence), GQA, a
    # value width unlike the head dim, a sliding window cutting the far band.
    from ropelab.kernels import band, cpu

    calls = []
    monkeypatch.setattr(cpu.BAND, "batch_rows", rows)
    monkeypatch.setattr(cpu.BAND, "batch_max_rows", 50)  # several batches per band
    monkeypatch.setattr(cpu, "attend_band", lambda *a, **k: (calls.append(a[0].shape[2]), band.attend_band(*a, **k)))
    check(M("leaky-rerope", window=300, scale=8), B=2, H=4, Hkv=2, S=1000, T=1000, Dv=12)
    check(M("self-extend", window=270, group=5), B=1, H=3, Hkv=1, S=1100, T=900, sliding_window=700)
    check(M("rerope", window=280), B=1, H=2, Hkv=1, S=900, T=900, rotary_dim=8)
    assert len(calls) >= 10 and all(n % rows == 0 for n in calls)  # every band took it, whole chunks only


def test_block_boundaries_with_padding():
    mask, offsets = left_padding(2, 1100, [0, 413])
    check(M("rerope", window=300, logn=True, train_length=256), B=2, H=2, Hkv=1, S=1100, T=1100,
          key_padding_mask=mask, position_offset=offsets)
    check(M("rope"), B=2, H=2, Hkv=1, S=1100, T=700, key_padding_mask=mask, position_offset=offsets)


def test_non_contiguous_inputs_and_large_positions():
    # transformers hands over (B, S, H, D) projections transposed to (B, H, S, D)
    q, k, v = inputs(B=2, H=4, Hkv=2, T=37, S=37)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    method = M("leaky-rerope", window=5, scale=3)
    inv_freq = freqs(method, 16, 37)[0]
    out = rotary_attention(q, k, v, method, inv_freq)
    assert (out.double() - reference(q, k, v, method, inv_freq)).abs().max() <= TOL
    # positions past the cached cos/sin tables (computed directly there)
    check(M("self-extend", window=6, group=3), T=3, position_offset=400_000)
    check(M("rerope", window=5), position_offset=torch.tensor([1_000_000, 3]))


# --------------------------------------------------------------------------------------
# equivalences (docs/methods.md)
# --------------------------------------------------------------------------------------


def _pair(m1, m2, **kw):
    q, k, v = inputs(**{k_: kw.pop(k_) for k_ in ("B", "H", "Hkv", "T", "S", "D") if k_ in kw})
    a = rotary_attention(q, k, v, m1, freqs(m1, q.shape[-1], k.shape[2])[0], **kw)
    b = rotary_attention(q, k, v, m2, freqs(m2, q.shape[-1], k.shape[2])[0], **kw)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("window", [37, 38, 1000])
def test_window_beyond_sequence_is_plain_rope(window):
    rope = M("rope")
    for method in (M("rerope", window=window), M("leaky-rerope", window=window, scale=8),
                   M("self-extend", window=window, group=4)):
        assert _pair(method, rope) <= 1e-6
        check(method)


def test_self_extend_with_huge_group_is_rerope():
    # ⌊i/G⌋ = 0 for every (non-negative) position: q at W, k at 0, which is ReRoPE with w = W
    assert _pair(M("self-extend", window=6, group=1000), M("rerope", window=6)) <= 1e-6
    assert _pair(M("self-extend", window=6, group=1000), M("rerope", window=6), T=3, position_offset=5) <= 1e-6


def test_leaky_with_k1_is_plain_rope():
    assert _pair(M("leaky-rerope", window=5, scale=1), M("rope")) <= 1e-5
    assert _pair(M("leaky-rerope", window=5, scale=1), M("rope"), T=2, S=30) <= 1e-5


def test_self_extend_group_one_is_plain_rope():
    assert _pair(M("self-extend", window=5, group=1), M("rope")) <= 1e-5


def test_prefill_equals_token_by_token_decoding():
    q, k, v = inputs(B=2, T=30, S=30)
    for method in METHODS.values():
        m = method()
        inv_freq = freqs(m, 16, 30)[0]
        full = rotary_attention(q, k, v, m, inv_freq)
        for t in (0, 4, 5, 6, 17, 29):
            step = rotary_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], m, inv_freq)
            assert (step - full[:, :, t : t + 1]).abs().max().item() <= TOL


# --------------------------------------------------------------------------------------
# random configurations
# --------------------------------------------------------------------------------------


@st.composite
def configs(draw):
    name = draw(st.sampled_from(["rope", "rerope", "leaky-rerope", "self-extend"]))
    S = draw(st.integers(1, 40))
    T = draw(st.integers(1, S))
    window = draw(st.integers(1, 45))
    params = {
        "rope": {},
        "rerope": {"window": window},
        "leaky-rerope": {"window": window, "scale": draw(st.sampled_from([1.0, 2.0, 7.5]))},
        "self-extend": {"window": window, "group": draw(st.integers(1, 9))},
    }[name]
    if draw(st.booleans()):
        params.update(logn=True, train_length=draw(st.integers(2, 30)))
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 3))
    D = draw(st.sampled_from([8, 12]))
    kw = dict(
        B=B, H=Hkv * draw(st.integers(1, 3)), Hkv=Hkv, T=T, S=S, D=D,
        rotary_dim=draw(st.sampled_from([D, 4])),
        layout=draw(st.sampled_from(["half", "interleaved"])),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 45))),
        softcap=draw(st.one_of(st.none(), st.just(2.0))),
        attention_factor=draw(st.sampled_from([1.0, 1.3])),
        Dv=draw(st.sampled_from([None, 6])),
        seed=draw(st.integers(0, 1000)),
    )
    if draw(st.booleans()):
        pads = [draw(st.integers(0, S - 1)) for _ in range(B)]
        mask, offsets = left_padding(B, S, pads)
        kw.update(key_padding_mask=mask, position_offset=offsets)
    return M(name, **params), kw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configurations(config):
    method, kw = config
    check(method, **kw)


# --------------------------------------------------------------------------------------
# merge, dtypes, padding rows, validation
# --------------------------------------------------------------------------------------


def test_merge_by_lse_is_attention_over_the_union():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    values = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)

    def part(cols):
        return torch.softmax(logits[..., cols], -1) @ values[:, cols], torch.logsumexp(logits[..., cols], -1)

    out, lse = merge_by_lse(*part(slice(0, 4)), *part(slice(4, 9)))
    assert torch.allclose(out, torch.softmax(logits, -1) @ values, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-12)
    empty = torch.full((2, 5), -math.inf, dtype=torch.float64)
    o1, l1 = part(slice(0, 9))
    out, lse = merge_by_lse(o1, l1, torch.zeros_like(o1), empty)
    assert torch.allclose(out, o1) and torch.allclose(lse, l1)
    out, lse = merge_by_lse(torch.zeros_like(o1), empty, torch.zeros_like(o1), empty)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_all_is_attention_over_the_union():
    from ropelab.kernels.merge import merge_all

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    values = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    logits[1, 2] = -math.inf  # a row that sees no key in any piece

    def part(cols):
        lse = torch.logsumexp(logits[..., cols], -1)
        return (torch.softmax(logits[..., cols], -1) @ values[:, cols]).nan_to_num(0.0), lse

    # strided destinations, as the band writes into views of its buffers
    out = torch.full((2, 3, 5), 7.0, dtype=torch.float64).transpose(1, 2)
    lse = torch.full((2, 5), 7.0, dtype=torch.float64)
    merge_all(out, lse, [part(slice(0, 3)), part(slice(3, 4)), part(slice(4, 12))])
    want = (torch.softmax(logits, -1) @ values).nan_to_num(0.0)
    # float64 on both sides, O(1) values, a dozen terms: rounding is ~1e-15, so 1e-12 is tight
    assert torch.allclose(out, want, atol=1e-12) and torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-12)
    assert (out[1, 2] == 0).all() and torch.isneginf(lse[1, 2])


def test_rows_with_no_real_key_are_zero_not_nan():
    mask, offsets = left_padding(2, 20, [0, 8])
    for method in (M("rerope", window=3), M("rope")):
        for softcap in (None, 2.0):
            q, k, v = inputs(B=2, T=20, S=20)
            out = rotary_attention(q, k, v, method, freqs(method, 16, 20)[0], key_padding_mask=mask,
                                   position_offset=offsets, softcap=softcap)
            assert torch.isfinite(out).all()
            assert (out[1, :, :8] == 0).all()


def test_gradients_through_the_eager_path():
    # With autograd recording the kernel's lse (no gradient) cannot carry the merge, so the
    # eager path runs; its gradients must equal the reference's, padded rows included.
    import ropelab.attention as attention

    mask, offsets = left_padding(2, 20, [0, 6])
    for method in (M("rerope", window=5), M("leaky-rerope", window=5, scale=3, logn=True, train_length=8),
                   M("self-extend", window=6, group=3)):
        q, k, v = (t.double().requires_grad_() for t in inputs(B=2, T=20, S=20))
        inv_freq = freqs(method, 8, 20)[0]
        kw = dict(layout="interleaved", key_padding_mask=mask, position_offset=offsets)
        attention._warned_slow_path = False
        with pytest.warns(UserWarning, match="differentiable eager path"):
            out = rotary_attention(q, k, v, method, inv_freq, **kw)
        weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        ref = reference(q, k, v, method, inv_freq, **kw)
        ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
        assert (out - ref).abs().max() < 1e-12
        for got, want in zip(grads, ref_grads):
            assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-12


def test_bfloat16_runs_and_is_close():
    method = M("rerope", window=5)
    q, k, v = inputs(T=37, S=37)
    inv_freq = freqs(method, 16, 37)[0]
    out = rotary_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), method, inv_freq)
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference(q, k, v, method, inv_freq)).abs().max().item() < 0.05


def test_no_far_rotation_for_rerope_keys_decoding(monkeypatch):
    # ReRoPE's far keys are used as cached: the far key position is never used to rotate
    import ropelab.kernels.plan as plan

    rotated = []
    original = plan.rotate

    def spy(x, *args, **kw):
        rotated.append(x.shape[2])
        return original(x, *args, **kw)

    monkeypatch.setattr(plan, "rotate", spy)
    q, k, v = inputs(T=1, S=300)
    method = M("rerope", window=16)
    out = rotary_attention(q, k, v, method, freqs(method, 16, 300)[0])
    assert sorted(rotated) == [1, 1, 16]  # q near, q far, the last w keys
    assert (out.double() - reference(q, k, v, method, freqs(method, 16, 300)[0])).abs().max() <= TOL


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda a: a.update(query=a["query"][0]), "query.shape"),
        (lambda a: a.update(key=a["key"][:, :, :, :8]), "key.shape[3]"),
        (lambda a: a.update(value=a["value"][:, :, :5]), "value.shape"),
        (lambda a: a.update(key=a["key"][:, :1].expand(2, 3, 37, 16), value=a["value"][:, :1].expand(2, 3, 37, 16)),
         "key.shape[1]"),
        (lambda a: a.update(query=torch.randn(2, 4, 38, 16)), "query.shape[2]"),
        (lambda a: a.update(key=a["key"].double()), "key.dtype"),
        (lambda a: a.update(layout="rotate"), "layout"),
        (lambda a: a.update(method="rerope"), "method"),
        (lambda a: a.update(inv_freq=torch.ones(9, dtype=torch.float64)), "inv_freq.shape"),
        (lambda a: a.update(key_padding_mask=torch.ones(2, 36, dtype=torch.bool)), "key_padding_mask.shape"),
        (lambda a: a.update(key_padding_mask=torch.ones(2, 37)), "key_padding_mask"),
        (lambda a: a.update(position_offset=torch.zeros(3, dtype=torch.int64)), "position_offset.shape"),
        (lambda a: a.update(position_offset=1.5), "position_offset"),
        (lambda a: a.update(sliding_window=0), "sliding_window"),
        (lambda a: a.update(scale=-1.0), "scale"),
        (lambda a: a.update(softcap=0), "softcap"),
        (lambda a: a.update(attention_factor=float("nan")), "attention_factor"),
    ],
)
def test_validation_names_the_field(change, field):
    q, k, v = inputs()
    method = M("rerope", window=5)
    args = dict(query=q, key=k, value=v, method=method, inv_freq=freqs(method, 16, 37)[0])
    change(args)
    with pytest.raises(ValueError, match="^" + re.escape(field) + "="):
        rotary_attention(**args)
