"""The float64 oracles of dca, string, lm-infinite and sinks (rope/position_maps.py), their
parts (rope/position_parts.py) and their parameter rules (rope/position_checks.py).

What is checked, and against what:
- small cases computed by hand from each method's description (DCA: the paper's Figure 2
  setting s = 6, c = 10, w = 4);
- the reductions to plain RoPE the authors state, at the exact boundary and one past it;
- prefix consistency of the reference attention;
- token-by-token decoding as each authors' code does it (their cache, their query and key
  positions), simulated independently in float64, equals the prefill under the map;
- cross-checks with the existing kernel where a map equals an existing method
  (lm-infinite with every key global is ReRoPE; sinks without sinks is a sliding window);
- the parts partition each map's visible pairs at the same distances, and merging the
  parts' attention by log-sum-exp gives the reference attention.

Tolerances: float64 against float64 computed in a different order (per-step decoding,
per-part merge) differs by summation rounding only, a few 1e-16 relative on O(1) outputs;
1e-12 leaves margin while any wrong key, position or mask moves outputs by ≥ 1e-3.
The existing kernel runs in float32, so comparisons with it use that suite's 1e-5
(tests/rope/test_attention.py explains it).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ropelab
from ropelab.attention import rotary_attention
from ropelab.position_checks import check_dca, check_lm_infinite, check_params, check_sinks, check_string
from ropelab.position_maps import (
    MAPS,
    STRING_ATTENTION_FACTOR,
    default_params,
    pair_map,
    reduces_to_rope,
    reference_attention,
    rope_map,
)
from ropelab.position_parts import parts
from ropelab.rotary import apply_rotary, cos_sin

F64 = torch.float64
TOL64 = 1e-12
TOL32 = 1e-5
NAN = math.nan
INV_FREQ = 1e4 ** (-torch.arange(0, 16, 2, dtype=F64) / 16)  # d = 16

# Small parameters that exercise every part within ~40 tokens.
PARAMS = {
    "dca": {"chunk_size": 9, "local_window": 3},
    "string": {"shift": 7, "local_window": 2},
    "lm-infinite": {"n_global": 3, "n_local": 6},
    "sinks": {"sinks": 2, "window": 5},
}


def inputs(B=2, H=4, Hkv=2, T=30, S=30, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=F64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=F64)
    return q, k, v


def rows(name, n, **params):
    m = pair_map(name, torch.arange(n), torch.arange(n), params)
    return m


def assert_rows(m, expected: dict[int, list[float]]):
    for i, row in expected.items():
        got = m.distance[i, : len(row)]
        want = torch.tensor(row, dtype=F64)
        assert torch.equal(got.isnan(), want.isnan()), (i, got, want)
        assert torch.equal(got.nan_to_num(-1), want.nan_to_num(-1)), (i, got, want)


# --------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------


def test_dca_paper_figure_2_setting():
    # s = 6, c = 10, w = 4 (the paper's Figure 2): successive-chunk query positions
    # [6, 7, 8, 9, 9, 9], so no distance exceeds c - 1 = 9.
    m = rows("dca", 12, chunk_size=9, local_window=3)
    assert_rows(m, {
        5: [5, 4, 3, 2, 1, 0],
        6: [6, 5, 4, 3, 2, 1, 0],
        9: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        10: [9, 8, 7, 6, 5, 4, 4, 3, 2, 1, 0],
        11: [9, 8, 7, 6, 5, 4, 5, 4, 3, 2, 1, 0],
    })
    assert m.distance.nan_to_num(0).max() == 9
    # a third chunk: inter-chunk queries sit at c - 1 = 9 against keys at j mod 6
    m = rows("dca", 18, chunk_size=9, local_window=3)
    assert_rows(m, {12: [9, 8, 7, 6, 5, 4, 6, 5, 4, 3, 2, 1, 0],
                    17: [9, 8, 7, 6, 5, 4, 9, 8, 7, 6, 5, 4, 5, 4, 3, 2, 1, 0]})
    assert torch.equal(m.key_position[17], torch.tensor([0, 1, 2, 3, 4, 5] * 3, dtype=F64))


def test_string_small_case():
    # S = 3, W = 1: r' = r below 3, r - 2 from 3 on; every key visible.
    m = rows("string", 8, shift=3, local_window=1, attention_factor=1.0)
    assert_rows(m, {7: [5, 4, 3, 2, 1, 2, 1, 0], 2: [2, 1, 0], 3: [1, 2, 1, 0]})
    assert m.attention_factor == 1.0
    assert rows("string", 4, shift=3, local_window=1).attention_factor == pytest.approx(1.0693147, abs=1e-7)


def test_lm_infinite_small_case():
    # 2 global tokens, local window 3: a Λ; far global keys sit at the limit 3.
    m = rows("lm-infinite", 8, n_global=2, n_local=3)
    assert_rows(m, {7: [3, 3, NAN, NAN, NAN, 2, 1, 0], 3: [3, 2, 1, 0], 4: [3, 3, 2, 1, 0]})
    assert (m.key_position[7, :2] == 0).all() and (m.query_position[7, :2] == 3).all()


def test_sinks_small_case_positions_in_the_cache():
    # 2 sinks, window 3, cache C = 5: from i = 6 on the query sits at slot 5.
    m = rows("sinks", 9, sinks=2, window=3)
    assert_rows(m, {8: [5, 4, NAN, NAN, NAN, 3, 2, 1, 0], 5: [5, 4, 3, 2, 1, 0], 6: [5, 4, NAN, 3, 2, 1, 0]})
    assert torch.equal(m.key_position[8, [0, 1, 5, 6, 7, 8]], torch.tensor([0, 1, 2, 3, 4, 5], dtype=F64))
    assert (m.query_position[8] == 5).all()


# --------------------------------------------------------------------------------------
# reductions to plain RoPE, at the boundary and one past it
# --------------------------------------------------------------------------------------

REDUCING = [
    ("dca", {"chunk_size": 9, "local_window": 3}, 9),
    ("dca", {"chunk_size": 20, "local_window": 0}, 20),
    ("string", {"shift": 7, "local_window": 2, "attention_factor": 1.0}, 6),
    ("lm-infinite", {"n_global": 1, "n_local": 6}, 6),
    ("lm-infinite", {"n_global": 0, "n_local": 6}, 5),
    ("sinks", {"sinks": 2, "window": 5}, 7),
    ("sinks", {"sinks": 0, "window": 5}, 5),
]


def same_as_rope(name, params, n):
    m = pair_map(name, torch.arange(n), torch.arange(n), params)
    r = rope_map(torch.arange(n), torch.arange(n))
    return torch.equal(m.visible, r.visible) and torch.equal(m.distance.nan_to_num(-1), r.distance.nan_to_num(-1))


@pytest.mark.parametrize("name,params,last", REDUCING)
def test_reduces_to_rope_exactly_up_to_the_boundary(name, params, last):
    assert reduces_to_rope(name, params, last) and same_as_rope(name, params, last + 1)
    assert not reduces_to_rope(name, params, last + 1) and not same_as_rope(name, params, last + 2)


def test_string_window_equal_to_shift_is_rope_at_any_length():
    params = {"shift": 4, "local_window": 4, "attention_factor": 1.0}
    assert reduces_to_rope("string", params, 100) and same_as_rope("string", params, 40)


def plain_rope_attention(q, k, v, inv_freq, factor=1.0):
    T, S = q.shape[2], k.shape[2]
    pos = torch.arange(S)
    c, s = cos_sin(pos, inv_freq, factor, "half", F64)
    kr = apply_rotary(k.repeat_interleave(q.shape[1] // k.shape[1], 1), c, s)
    qr = apply_rotary(q, c[S - T:], s[S - T:])
    logits = (qr @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    hide = torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]
    return torch.softmax(logits.masked_fill(hide, -math.inf), -1) @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)


@pytest.mark.parametrize("name,params,last", REDUCING)
def test_reference_attention_reduces_to_rope(name, params, last):
    q, k, v = inputs(T=last + 1, S=last + 1)
    out = reference_attention(q, k, v, name, params, INV_FREQ)
    assert (out - plain_rope_attention(q, k, v, INV_FREQ)).abs().max() <= TOL64
    q, k, v = inputs(T=last + 2, S=last + 2)  # one past: a different attention
    out = reference_attention(q, k, v, name, params, INV_FREQ)
    assert (out - plain_rope_attention(q, k, v, INV_FREQ)).abs().max() > 1e-3


def test_string_attention_factor_scales_every_logit():
    q, k, v = inputs(T=6, S=6)
    f = STRING_ATTENTION_FACTOR
    out = reference_attention(q, k, v, "string", {"shift": 7, "local_window": 2}, INV_FREQ)
    assert (out - plain_rope_attention(q, k, v, INV_FREQ, f)).abs().max() <= TOL64


# --------------------------------------------------------------------------------------
# prefix consistency
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARAMS)
def test_prefix_rows_do_not_depend_on_later_keys(name):
    q, k, v = inputs(T=36, S=36)
    full = reference_attention(q, k, v, name, PARAMS[name], INV_FREQ)
    for n in (1, 7, 19, 30):
        part = reference_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], name, PARAMS[name], INV_FREQ)
        assert (full[:, :, :n] - part).abs().max() <= TOL64


@pytest.mark.parametrize("name", PARAMS)
def test_left_padding_is_running_alone(name):
    # Maps follow text positions: a sequence padded on the left by 6 attends as it does alone.
    q, k, v = inputs(B=2, T=30, S=30)
    pads = torch.tensor([0, 6])
    mask = torch.arange(30)[None, :] >= pads[:, None]
    padded = reference_attention(q, k, v, name, PARAMS[name], INV_FREQ, position_offset=-pads, key_padding_mask=mask)
    alone = reference_attention(q[1:, :, 6:], k[1:, :, 6:], v[1:, :, 6:], name, PARAMS[name], INV_FREQ)
    assert (padded[1:, :, 6:] - alone).abs().max() <= TOL64
    assert (padded[1:, :, :6] == 0).all()  # padding rows see no real key


# --------------------------------------------------------------------------------------
# the authors' decoding, simulated token by token, equals the prefill
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cos_sin_at(position: int, factor: float):
    return cos_sin(torch.tensor(float(position)), INV_FREQ, factor, "half", F64)


def rot(x, position, factor=1.0):
    """Rotate x (..., D) at one integer position."""
    return apply_rotary(x, *_cos_sin_at(int(position), float(factor)))


def softmax_rows(logits_and_values):
    """Attention of one query over (logit (B, H), value (B, H, D)) pairs."""
    logits = torch.stack([lv[0] for lv in logits_and_values], -1)
    values = torch.stack([lv[1] for lv in logits_and_values], -2)
    w = torch.softmax(logits, -1)
    return (w[..., None] * values).sum(-2)


def decode(q, k, v, step):
    """Token-by-token outputs (B, H, S, D): step(i, q_i, k, v) -> [(logit, value), ...]."""
    H = q.shape[1]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    return torch.stack([softmax_rows(step(i, q[:, :, i], k, v)) for i in range(q.shape[2])], 2)


def dot(a, b):
    return (a * b).sum(-1) * a.shape[-1] ** -0.5


def sinks_step_factory(sinks, window):
    """eval_long_ppl.py with StartRecentKVCache and pos_shift: the cache holds (text index)
    entries; after each step it keeps its first `sinks` and last `window` once it is longer
    than sinks + window; keys rotate at their slot, the query at the last slot."""
    cache: list[int] = []

    def step(i, qi, k, v):
        cache.append(i)
        slot_q = len(cache) - 1
        out = [(dot(rot(qi, slot_q), rot(k[:, :, j], slot)), v[:, :, j]) for slot, j in enumerate(cache)]
        if len(cache) > sinks + window:
            del cache[sinks: len(cache) - window]
        return out

    return step


def lm_infinite_step_factory(n_global, n_local):
    """lambda_attention.py, single-query mode (models/llama.py keeps every key): the first
    n_global keys unrotated against the query rotated at min(limit, l - 1), limit = n_local,
    where not closer than n_local; the last n_local keys rotated at their own positions."""

    def step(i, qi, k, v):
        length = i + 1
        stationary_q = rot(qi, min(n_local, length - 1))
        out = [(dot(stationary_q, k[:, :, j]), v[:, :, j]) for j in range(min(n_global, length)) if i - j >= n_local]
        out += [(dot(rot(qi, i), rot(k[:, :, j], j)), v[:, :, j]) for j in range(max(0, length - n_local), length)]
        return out

    return step


def dca_step_factory(chunk_size, local_window):
    """chunkllama_attn_replace.py's `has_kv_cache` branch: keys cached rotated at j mod C;
    the query at t (own chunk), at min(t + C, chunk_size) (previous chunk) and at that
    table's entry for offset C - 1 (older chunks)."""
    C = chunk_size - local_window
    qc = lambda t: min(t + C, chunk_size)  # noqa: E731

    def step(i, qi, k, v):
        n, t = divmod(i, C)
        out = [(dot(rot(qi, t), rot(k[:, :, j], j % C)), v[:, :, j]) for j in range(n * C, i + 1)]
        if n >= 1:
            out += [(dot(rot(qi, qc(t)), rot(k[:, :, j], j % C)), v[:, :, j]) for j in range((n - 1) * C, n * C)]
        if n >= 2:
            out += [(dot(rot(qi, qc(C - 1)), rot(k[:, :, j], j % C)), v[:, :, j]) for j in range(0, (n - 1) * C)]
        return out

    return step


def string_step_factory(shift, local_window, attention_factor):
    """string_for_llama.py's decoding branch: the last `shift` keys with the query at its
    position, the older ones with the query at position - shift + local_window; cos and
    sin carry the attention factor for queries and keys alike."""
    f = attention_factor

    def step(i, qi, k, v):
        length = i + 1
        near = [(dot(rot(qi, i, f), rot(k[:, :, j], j, f)), v[:, :, j]) for j in range(max(0, length - shift), length)]
        shifted = [(dot(rot(qi, i - shift + local_window, f), rot(k[:, :, j], j, f)), v[:, :, j])
                   for j in range(0, max(0, length - shift))]
        return near + shifted

    return step


STEPS = {
    "sinks": lambda p: sinks_step_factory(**p),
    "lm-infinite": lambda p: lm_infinite_step_factory(**p),
    "dca": lambda p: dca_step_factory(**p),
    "string": lambda p: string_step_factory(p["shift"], p["local_window"], STRING_ATTENTION_FACTOR),
}


@pytest.mark.parametrize("name", PARAMS)
def test_authors_decoding_equals_prefill(name):
    q, k, v = inputs(T=33, S=33)
    prefill = reference_attention(q, k, v, name, PARAMS[name], INV_FREQ)
    decoded = decode(q, k, v, STEPS[name](PARAMS[name]))
    assert (prefill - decoded).abs().max() <= TOL64


def test_string_authors_prefill_counts_the_key_at_shift_twice():
    # string_for_llama.py's flash prefill: near part r <= S (inclusive window), shifted part
    # r >= S. The map follows their decoding (r = S shifted only); the prefill's extra copy of
    # that key changes exactly the rows that have one.
    S, W, f = 5, 2, STRING_ATTENTION_FACTOR
    q, k, v = inputs(T=20, S=20)

    def prefill_step(i, qi, k, v):
        near = [(dot(rot(qi, i, f), rot(k[:, :, j], j, f)), v[:, :, j]) for j in range(max(0, i - S), i + 1)]
        shifted = [(dot(rot(qi, i - S + W, f), rot(k[:, :, j], j, f)), v[:, :, j]) for j in range(0, i - S + 1)]
        return near + shifted

    ref = reference_attention(q, k, v, "string", {"shift": S, "local_window": W}, INV_FREQ)
    theirs = decode(q, k, v, prefill_step)
    assert (theirs[:, :, :S] - ref[:, :, :S]).abs().max() <= TOL64
    assert (theirs[:, :, S:] - ref[:, :, S:]).abs().amax(dim=(0, 1, 3)).min() > 1e-6


@pytest.mark.parametrize("params", [{"sinks": 4, "window": 4}, {"sinks": 0, "window": 3}, {"sinks": 1, "window": 9}])
def test_sinks_decoding_other_sizes(params):
    q, k, v = inputs(T=25, S=25, seed=3)
    prefill = reference_attention(q, k, v, "sinks", params, INV_FREQ)
    assert (prefill - decode(q, k, v, sinks_step_factory(**params))).abs().max() <= TOL64


@pytest.mark.parametrize("params", [{"n_global": 0, "n_local": 4}, {"n_global": 10, "n_local": 4}])
def test_lm_infinite_decoding_other_sizes(params):
    q, k, v = inputs(T=25, S=25, seed=4)
    prefill = reference_attention(q, k, v, "lm-infinite", params, INV_FREQ)
    assert (prefill - decode(q, k, v, lm_infinite_step_factory(**params))).abs().max() <= TOL64


# --------------------------------------------------------------------------------------
# cross-checks with the existing kernel
# --------------------------------------------------------------------------------------


def test_lm_infinite_with_every_key_global_is_rerope():
    q, k, v = inputs(T=30, S=30)
    ref = reference_attention(q, k, v, "lm-infinite", {"n_global": 30, "n_local": 6}, INV_FREQ)
    out = rotary_attention(q.float(), k.float(), v.float(), ropelab.get_method("rerope", window=6), INV_FREQ)
    assert (out.double() - ref).abs().max() <= TOL32


def test_sinks_without_sinks_is_a_sliding_window():
    q, k, v = inputs(T=30, S=30)
    ref = reference_attention(q, k, v, "sinks", {"sinks": 0, "window": 5}, INV_FREQ)
    out = rotary_attention(q.float(), k.float(), v.float(), ropelab.get_method("rope"), INV_FREQ, sliding_window=6)
    assert (out.double() - ref).abs().max() <= TOL32


def test_reference_options_match_the_kernel_on_plain_rope():
    # left padding, GQA, sliding window, soft-cap, attention factor and scale, decoding rows
    q, k, v = inputs(B=2, H=6, Hkv=2, T=5, S=30)
    pads = torch.tensor([0, 7])
    mask = torch.arange(30)[None, :] >= pads[:, None]
    kw = dict(attention_factor=1.3, position_offset=-pads, key_padding_mask=mask, sliding_window=9, scale=0.2,
              softcap=2.0)
    ref = reference_attention(q, k, v, "rope", {}, INV_FREQ, **kw)
    out = rotary_attention(q.float(), k.float(), v.float(), ropelab.get_method("rope"), INV_FREQ, **kw)
    assert (out.double() - ref).abs().max() <= TOL32


# --------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------


def part_masks(name, params, n):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    out = []
    for p in parts(name, params):
        inside = (j >= p.key_start(i).clamp(min=0)) & (j < p.key_stop(i).clamp(max=i + 1))
        qpos = p.query_position(i).to(F64).expand(n, n)
        kpos = (p.key_position(j) if p.key_position is not None else torch.zeros_like(j)).to(F64).expand(n, n)
        out.append((p, inside, (qpos - kpos) / p.freq_divisor))
    return out


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("n", [1, 5, 17, 40])
def test_parts_partition_the_map(name, n):
    m = pair_map(name, torch.arange(n), torch.arange(n), PARAMS[name])
    covered = torch.zeros(n, n, dtype=torch.int64)
    for _, inside, distance in part_masks(name, PARAMS[name], n):
        covered += inside
        assert torch.equal(distance[inside], m.distance[inside])
    assert covered.max() <= 1 and torch.equal(covered.bool(), m.visible)


@pytest.mark.parametrize("name", PARAMS)
def test_parts_merged_by_lse_give_the_reference(name):
    q, k, v = inputs(B=1, H=2, Hkv=1, T=35, S=35)
    n = 35
    factor = PARAMS[name].get("attention_factor", STRING_ATTENTION_FACTOR if name == "string" else 1.0)
    outs, lses = [], []
    for p, inside, _ in part_masks(name, PARAMS[name], n):
        i = torch.arange(n)
        c, s = cos_sin(p.query_position(i), INV_FREQ / p.freq_divisor, factor, "half", F64)
        qr = apply_rotary(q, c, s)
        if p.key_position is None:  # unrotated keys: both factors on the query
            kr, qr = k, qr * factor
        else:
            c, s = cos_sin(p.key_position(i), INV_FREQ / p.freq_divisor, factor, "half", F64)
            kr = apply_rotary(k, c, s)
        logits = (qr @ kr.transpose(-1, -2)).masked_fill(~inside, -math.inf) * 16**-0.5
        lse = torch.logsumexp(logits, -1)
        outs.append(torch.softmax(logits, -1).nan_to_num(0.0) @ v)
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), 0)
    merged = sum(o * torch.exp(l - total)[..., None].nan_to_num(0.0) for o, l in zip(outs, lses))
    ref = reference_attention(q, k, v, name, PARAMS[name], INV_FREQ)
    assert (merged - ref).abs().max() <= TOL64


# --------------------------------------------------------------------------------------
# parameters: the authors' defaults and the rules
# --------------------------------------------------------------------------------------


def test_defaults_for_a_llama2_4k_model():
    assert default_params("dca", 4096) == {"chunk_size": 3072, "local_window": 512}
    assert default_params("string", 4096)["shift"] == 1351 and default_params("string", 4096)["local_window"] == 128
    assert default_params("lm-infinite", 4096) == {"n_global": 10, "n_local": 4096}
    assert default_params("sinks", 4096) == {"sinks": 4, "window": 2000}
    assert default_params("string", 131072)["shift"] == 43253  # the README's Llama 3.1 value


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("L", [64, 2048, 4096, 8192, 131072])
def test_defaults_pass_their_own_rules(name, L):
    check_params(name, default_params(name, L), L)


BAD = [
    (check_dca, dict(chunk_size=0, local_window=0), "chunk_size=0"),
    (check_dca, dict(chunk_size=8, local_window=-1), "local_window=-1"),
    (check_dca, dict(chunk_size=8, local_window=4), "local_window=4"),
    (check_dca, dict(chunk_size=8.0, local_window=1), "chunk_size=8.0"),
    (check_dca, dict(chunk_size=4096, local_window=512, train_length=4096), "chunk_size=4096"),
    (check_string, dict(shift=0, local_window=0), "shift=0"),
    (check_string, dict(shift=4, local_window=5), "local_window=5"),
    (check_string, dict(shift=4, local_window=1, attention_factor=0.0), "attention_factor=0.0"),
    (check_string, dict(shift=4, local_window=1, attention_factor=math.inf), "attention_factor=inf"),
    (check_lm_infinite, dict(n_global=-1, n_local=4), "n_global=-1"),
    (check_lm_infinite, dict(n_global=1, n_local=0), "n_local=0"),
    (check_lm_infinite, dict(n_global=1, n_local=4097, train_length=4096), "n_local=4097"),
    (check_sinks, dict(sinks=5, window=4), "sinks=5"),
    (check_sinks, dict(sinks=True, window=4), "sinks=True"),
    (check_sinks, dict(sinks=4, window=0), "window=0"),
    (check_sinks, dict(sinks=4, window=4093, train_length=4096), "window=4093"),
]


@pytest.mark.parametrize("check,kwargs,starts", BAD)
def test_bad_parameters_name_field_value_and_rule(check, kwargs, starts):
    with pytest.raises(ValueError) as err:
        check(**kwargs)
    assert str(err.value).startswith(starts + ":") and len(str(err.value)) > len(starts) + 20


def test_params_are_checked_by_name():
    with pytest.raises(ValueError, match="^window=3: is not a parameter of dca"):
        pair_map("dca", torch.arange(4), torch.arange(4), {"chunk_size": 8, "local_window": 1, "window": 3})
    with pytest.raises(ValueError, match="^local_window=None: is required by dca"):
        pair_map("dca", torch.arange(4), torch.arange(4), {"chunk_size": 8})
    with pytest.raises(ValueError, match="^name='dcaa'"):
        pair_map("dcaa", torch.arange(4), torch.arange(4), {})
    assert sorted(MAPS) == ["dca", "lm-infinite", "rope", "sinks", "string"]


def test_parameters_at_or_above_the_sequence_are_allowed():
    # chunk size, shift, local window and cache all beyond a 10-token sequence: no error, plain RoPE
    for name, params in [("dca", {"chunk_size": 50, "local_window": 3}),
                         ("string", {"shift": 50, "local_window": 3, "attention_factor": 1.0}),
                         ("lm-infinite", {"n_global": 4, "n_local": 50}), ("sinks", {"sinks": 4, "window": 50})]:
        assert same_as_rope(name, params, 10)


# --------------------------------------------------------------------------------------
# random parameters: the parts and the reduction rule hold everywhere
# --------------------------------------------------------------------------------------


@st.composite
def method_params(draw):
    name = draw(st.sampled_from(sorted(PARAMS)))
    if name == "dca":
        w = draw(st.integers(0, 6))
        params = {"chunk_size": draw(st.integers(2 * w + 1, 2 * w + 14)), "local_window": w}
    elif name == "string":
        shift = draw(st.integers(1, 15))
        params = {"shift": shift, "local_window": draw(st.integers(0, shift)), "attention_factor": 1.0}
    elif name == "lm-infinite":
        params = {"n_global": draw(st.integers(0, 6)), "n_local": draw(st.integers(1, 15))}
    else:
        window = draw(st.integers(1, 12))
        params = {"sinks": draw(st.integers(0, window)), "window": window}
    return name, params


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method_params(), st.integers(1, 45))
def test_random_parameters(name_params, n):
    name, params = name_params
    m = pair_map(name, torch.arange(n), torch.arange(n), params)
    covered = torch.zeros(n, n, dtype=torch.int64)
    for _, inside, distance in part_masks(name, params, n):
        covered += inside
        assert torch.equal(distance[inside], m.distance[inside])
    assert covered.max() <= 1 and torch.equal(covered.bool(), m.visible)
    # reduces_to_rope is exact: true if and only if the map is plain RoPE on positions < n
    assert reduces_to_rope(name, params, n - 1) == same_as_rope(name, params, n)
    # no distance beyond what the method promises
    top = m.distance.nan_to_num(0).max().item()
    bound = {"dca": params.get("chunk_size"), "lm-infinite": params.get("n_local"),
             "sinks": params.get("sinks", 0) + params.get("window", 0)}.get(name)
    if bound is not None:
        assert top <= bound
