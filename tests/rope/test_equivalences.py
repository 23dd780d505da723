"""Every reduction in docs/methods.md ("Equivalences every implementation must pass")
checked on the method objects themselves. The kernels' versions of the same equivalences
(on attention outputs) live in test_attention.py; through a model, in tests/patches."""

import math

import pytest
import torch

import ropelab
from ropelab import frequencies as fm

DIM, BASE, L = 64, 1e5, 8192
ROPE = ropelab.get_method("rope").frequencies(DIM, BASE)


def freqs(name, **params):
    return ropelab.get_method(name, train_length=L, **params).frequencies(DIM, BASE)


@pytest.mark.parametrize(
    "name,params",
    [("linear", {}), ("ntk", {}), ("ntk-old", {}), ("beta-base", {}), ("beta-base", {"beta": 0.0}), ("yarn", {}), ("llama3", {})],
)
def test_scale_one_is_plain_rope(name, params):
    got = freqs(name, scale=1, **params)
    # float64 arithmetic like θ·1/1·ramp + θ·(1-ramp) may round in the last bit
    torch.testing.assert_close(got.inv_freq, ROPE.inv_freq, rtol=1e-15, atol=0)
    assert got.attention_factor == 1.0


@pytest.mark.parametrize("seq_len", [1, 100, L - 1, L])
def test_dynamic_ntk_within_training_length_is_plain_rope(seq_len):
    got = ropelab.get_method("dynamic-ntk", scale=4, train_length=L).frequencies(DIM, BASE, seq_len=seq_len)
    torch.testing.assert_close(got.inv_freq, ROPE.inv_freq, rtol=1e-15, atol=0)


def test_dynamic_ntk_changes_past_training_length_and_others_do_not():
    dyn = ropelab.get_method("dynamic-ntk", scale=4, train_length=L)
    assert not torch.equal(dyn.frequencies(DIM, BASE, seq_len=L + 1).inv_freq, ROPE.inv_freq)
    assert not torch.equal(dyn.frequencies(DIM, BASE, 2 * L).inv_freq, dyn.frequencies(DIM, BASE, 3 * L).inv_freq)
    assert dyn.length_dependent
    for name, params in [("ntk", {"scale": 2}), ("yarn", {"scale": 2}), ("rerope", {"window": 16})]:
        method = ropelab.get_method(name, train_length=L, **params)
        assert not method.length_dependent
        assert torch.equal(method.frequencies(DIM, BASE, 10).inv_freq, method.frequencies(DIM, BASE, 10 * L).inv_freq)


def test_dynamic_ntk_per_query_is_prefix_consistent_but_needs_the_attention_route():
    """per_query=true: each query uses its own length's frequencies (the same function of the
    length as the default mode), so a prefix never changes: not length-dependent, but the
    patch must still apply RoPE per query (`per_query_frequencies`)."""
    per_query = ropelab.get_method("dynamic-ntk", scale=4, per_query=True, train_length=L)
    default = ropelab.get_method("dynamic-ntk", scale=4, train_length=L)
    assert not per_query.length_dependent and per_query.per_query_frequencies
    assert default.length_dependent and not default.per_query_frequencies
    assert not ropelab.get_method("ntk", scale=2).per_query_frequencies
    for seq_len in (1, L, 3 * L):
        assert torch.equal(per_query.frequencies(DIM, BASE, seq_len).inv_freq, default.frequencies(DIM, BASE, seq_len).inv_freq)
    inner = ropelab.get_method("rerope", window=64, frequency_method=per_query, train_length=L)
    assert inner.per_query_frequencies and not inner.length_dependent


@pytest.mark.parametrize("scale", [2, 4, 12])
def test_beta_base_extremes(scale):
    # β = 0: position interpolation
    torch.testing.assert_close(freqs("beta-base", scale=scale, beta=0.0).inv_freq, freqs("linear", scale=scale).inv_freq, rtol=1e-14, atol=0)
    # β = 1: Su's NTK-RoPE-fixed in this indexing, θ_i·s^(-2(i+1)/d)
    i = torch.arange(DIM // 2, dtype=torch.float64)
    fixed = ROPE.inv_freq * scale ** (-2 * (i + 1) / DIM)
    torch.testing.assert_close(freqs("beta-base", scale=scale, beta=1.0).inv_freq, fixed, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["linear", "ntk", "beta-base", "yarn"])
def test_lowest_frequency_scaled_by_exactly_one_over_s(name):
    # the common design point of the NTK family: the longest wavelength stretches by s
    # (yarn: the lowest pairs lie past the ramp's upper bound, so they are pure θ/s)
    got = freqs(name, scale=4).inv_freq
    assert got[-1].item() == pytest.approx(ROPE.inv_freq[-1].item() / 4, rel=1e-12)


def test_ntk_keeps_highest_frequency():
    assert freqs("ntk", scale=8).inv_freq[0].item() == 1.0
    assert freqs("ntk-old", scale=8).inv_freq[-1].item() == pytest.approx(fm.rope_inv_freq(DIM, BASE * 8)[-1].item())


I = torch.arange(0, 300).repeat_interleave(300)
J = torch.arange(0, 300).repeat(300)
CAUSAL = J <= I


def mapped(name, **params):
    rel = ropelab.get_method(name, **params).relative
    return rel.mapped_distance(I[CAUSAL], J[CAUSAL])


R = (I - J)[CAUSAL].double()


@pytest.mark.parametrize(
    "name,params",
    [
        ("rerope", {"window": 300}),
        ("rerope", {"window": 10_000}),
        ("leaky-rerope", {"window": 300, "scale": 16}),
        ("leaky-rerope", {"window": 7, "scale": 1}),
        ("self-extend", {"window": 5, "group": 1}),
        ("self-extend", {"window": 300, "group": 8}),
    ],
)
def test_relative_maps_that_are_plain_rope(name, params):
    assert torch.equal(mapped(name, **params), R)


def test_leaky_tends_to_rerope():
    w = 17
    rerope = mapped("rerope", window=w)
    assert torch.equal(rerope, R.clamp(max=w))
    for k, tol in [(1e3, 0.3), (1e6, 3e-4), (1e9, 3e-7)]:
        gap = (mapped("leaky-rerope", window=w, scale=k) - rerope).abs().max().item()
        assert 0 < gap <= tol


def test_self_extend_with_huge_group_is_rerope():
    assert torch.equal(mapped("self-extend", window=23, group=1000), mapped("rerope", window=23))


def test_relative_maps_match_methods_md_formulas():
    w, k, g = 20, 4.0, 3
    assert torch.equal(mapped("rerope", window=w), torch.where(R < w, R, torch.full_like(R, w)))
    assert torch.allclose(mapped("leaky-rerope", window=w, scale=k), torch.where(R < w, R, w + (R - w) / k), rtol=0, atol=1e-12)
    i, j = I[CAUSAL], J[CAUSAL]
    se = (i // g - j // g + w - w // g).double()
    assert torch.equal(mapped("self-extend", window=w, group=g), torch.where(R < w, R, se))


def test_logn_is_one_inside_training_length_and_grows_after():
    method = ropelab.get_method("rope", logn=True, train_length=512)
    inside = method.query_scale(torch.arange(512))
    assert torch.equal(inside, torch.ones(512, dtype=torch.float64))
    after = method.query_scale(torch.tensor([512, 4095]))
    assert after[0].item() == pytest.approx(math.log(513) / math.log(512))
    assert after[1].item() == pytest.approx(math.log(4096) / math.log(512))
    assert ropelab.get_method("rope").query_scale(torch.arange(5)) is None


def test_logn_needs_train_length():
    with pytest.raises(ValueError, match="train_length=None"):
        ropelab.get_method("rerope", window=4, logn=True).query_scale(torch.arange(3))


def test_composition_leaky_over_ntk_uses_ntk_frequencies():
    ntk = ropelab.get_method("ntk", scale=2)
    leaky = ropelab.get_method("leaky-rerope", window=64, scale=8, frequency_method=ntk, logn=True, train_length=L)
    torch.testing.assert_close(leaky.frequencies(DIM, BASE).inv_freq, ntk.frequencies(DIM, BASE).inv_freq, rtol=0, atol=0)
    yarn_inner = ropelab.get_method("rerope", window=64, frequency_method=ropelab.get_method("yarn", scale=4), train_length=L)
    assert yarn_inner.frequencies(DIM, BASE).attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn_inner.needs_train_length and not leaky.length_dependent
    dyn_inner = ropelab.get_method("rerope", window=64, frequency_method=ropelab.get_method("dynamic-ntk", scale=2))
    assert dyn_inner.length_dependent


def test_logn_is_finite_for_padding_positions():
    method = ropelab.get_method("rope", logn=True, train_length=16)
    assert torch.equal(method.query_scale(torch.tensor([-5, -1, 0])), torch.ones(3, dtype=torch.float64))
