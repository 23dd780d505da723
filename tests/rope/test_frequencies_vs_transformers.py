"""transformers' ROPE_INIT_FUNCTIONS is the oracle for the methods it also ships
(litgpt's approach): same settings, same inverse frequencies and attention factor."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import ropelab

# transformers computes in float32 (base ** (arange/dim) and friends), ours in float64:
# the two agree to a few float32 ulp, i.e. ~1e-6 relative. Absolute tolerance is 0 because
# the lowest frequencies are ~1e-6 themselves.
RTOL = 2e-6


def hf_frequencies(rope_type, dim, base, max_positions, seq_len=None, **params):
    config = LlamaConfig(
        hidden_size=dim * 2,
        num_attention_heads=2,
        head_dim=dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": rope_type, "rope_theta": base, **params},
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    return inv_freq, factor


def assert_same(ours, theirs):
    torch.testing.assert_close(ours.inv_freq.float(), theirs[0], rtol=RTOL, atol=0)
    assert ours.attention_factor == pytest.approx(theirs[1], rel=1e-12)


@pytest.mark.parametrize("dim,base", [(64, 1e5), (128, 1e4), (80, 5e5), (32, 1e6)])
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 8.5])
def test_linear(dim, base, scale):
    ours = ropelab.get_method("linear", scale=scale).frequencies(dim, base)
    assert_same(ours, hf_frequencies("linear", dim, base, 4096, factor=scale))


@pytest.mark.parametrize("dim,base,length", [(64, 1e5, 8192), (128, 1e4, 4096), (96, 5e5, 2048)])
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 16.0])
@pytest.mark.parametrize("beta_fast,beta_slow", [(32, 1), (16, 2)])
def test_yarn(dim, base, length, scale, beta_fast, beta_slow):
    method = ropelab.get_method("yarn", scale=scale, train_length=length, beta_fast=beta_fast, beta_slow=beta_slow)
    theirs = hf_frequencies(
        "yarn",
        dim,
        base,
        int(length * scale),
        factor=scale,
        original_max_position_embeddings=length,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    assert_same(method.frequencies(dim, base), theirs)


def test_yarn_explicit_attention_factor():
    method = ropelab.get_method("yarn", scale=4, train_length=4096, attention_factor=1.5)
    theirs = hf_frequencies("yarn", 128, 1e4, 16384, factor=4.0, original_max_position_embeddings=4096, attention_factor=1.5)
    assert_same(method.frequencies(128, 1e4), theirs)


@pytest.mark.parametrize("dim,base,length", [(64, 1e5, 8192), (128, 5e5, 8192), (128, 1e4, 2048)])
@pytest.mark.parametrize("scale,low,high", [(8, 1, 4), (2, 1, 4), (4, 2, 8), (1, 1, 4)])
def test_llama3(dim, base, length, scale, low, high):
    method = ropelab.get_method("llama3", scale=scale, train_length=length, low_freq_factor=low, high_freq_factor=high)
    theirs = hf_frequencies(
        "llama3",
        dim,
        base,
        int(length * scale),
        factor=float(scale),
        low_freq_factor=float(low),
        high_freq_factor=float(high),
        original_max_position_embeddings=length,
    )
    assert_same(method.frequencies(dim, base), theirs)


@pytest.mark.parametrize("dim,base,length", [(64, 1e5, 8192), (128, 1e4, 4096)])
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("seq_frac", [0.25, 1.0, 1.5, 3.0, 7.25])
def test_dynamic_ntk(dim, base, length, scale, seq_frac):
    seq_len = int(length * seq_frac)
    method = ropelab.get_method("dynamic-ntk", scale=scale, train_length=length)
    theirs = hf_frequencies("dynamic", dim, base, length, seq_len=seq_len, factor=scale)
    assert_same(method.frequencies(dim, base, seq_len=seq_len), theirs)


def test_yarn_reference_numbers_from_methods_md():
    factors = [ropelab.get_method("yarn", scale=s, train_length=4096).frequencies(128, 1e4).attention_factor for s in (2, 4, 8, 16, 32)]
    assert [round(f, 4) for f in factors] == [1.0693, 1.1386, 1.2079, 1.2773, 1.3466]
    assert ropelab.frequencies.yarn_ramp_bounds(128, 1e4, 4096, 32, 1) == (20, 46)


def test_beta_base_reference_numbers_from_methods_md():
    assert ropelab.frequencies.beta_base_coefficient(128, 12, 0.75) == pytest.approx(0.10982, abs=5e-6)
    method = ropelab.get_method("beta-base", scale=12, beta=0.75)
    scaled, plain = method.frequencies(128, 1e4).inv_freq, ropelab.get_method("rope").frequencies(128, 1e4).inv_freq
    assert (scaled[-1] / plain[-1]).item() == pytest.approx(1 / 12, rel=1e-12)


def test_llama3_blend_rule_by_hand():
    """One pair from each regime of docs/methods.md's rule, computed by hand."""
    dim, base, length, s = 128, 5e5, 8192, 8
    inv = ropelab.get_method("llama3", scale=s, train_length=length).frequencies(dim, base).inv_freq
    theta = ropelab.get_method("rope").frequencies(dim, base).inv_freq
    wavelength = 2 * math.pi / theta
    for i in range(dim // 2):
        lam, t = wavelength[i].item(), theta[i].item()
        if lam < length / 4:
            expect = t
        elif lam > length / 1:
            expect = t / s
        else:
            smooth = (length / lam - 1) / (4 - 1)
            expect = (1 - smooth) * t / s + smooth * t
        assert inv[i].item() == pytest.approx(expect, rel=1e-12)


def _factors(n, step, start=1.0):
    return [start + step * i for i in range(n)]


@pytest.mark.parametrize("dim,base,length", [(64, 1e4, 4096), (96, 1e4, 4096), (32, 5e5, 2048)])
@pytest.mark.parametrize("max_positions", [4096 * 32, 4096])  # s from the ratio: 32 (Phi-3-128k's), and 1 (no scaling)
@pytest.mark.parametrize("extra", [{}, {"factor": 8.0}, {"attention_factor": 1.3}])
@pytest.mark.parametrize("seq_frac", [None, 1.0, 1.5])  # short, still short (l = L), long
def test_longrope(dim, base, length, max_positions, extra, seq_frac):
    """transformers' `longrope`, with its rule for s (config factor, else max/original) and
    for the attention factor; `with_model` reads the same config fields."""
    max_positions = max(max_positions, length)
    short, long = _factors(dim // 2, 0.01), _factors(dim // 2, 0.5, 1.2)
    seq_len = None if seq_frac is None else int(length * seq_frac)
    theirs = hf_frequencies("longrope", dim, base, max_positions, seq_len=seq_len, short_factor=short, long_factor=long,
                            original_max_position_embeddings=length, **extra)
    params = {"rope_type": "longrope", "short_factor": short, "long_factor": long, **extra}
    ours = ropelab.get_method("longrope").with_model(length, params, max_positions)
    assert_same(ours.frequencies(dim, base, seq_len), theirs)
    given = {"factor": "scale", "attention_factor": "attention_factor"}
    explicit = ropelab.get_method("longrope", short_factor=short, long_factor=long, train_length=length,
                                  scale=extra.get("factor", max_positions / length),
                                  **{given[k]: v for k, v in extra.items() if k == "attention_factor"})
    assert_same(explicit.frequencies(dim, base, seq_len), theirs)
