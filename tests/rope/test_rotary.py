"""The rotation kernels against transformers' own apply_rotary_pos_emb and against
brute-force 2×2 rotations; angles exact at long range."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

import ropelab
from ropelab.rotary import apply_rotary, cos_sin, sinusoidal_table


def test_half_layout_matches_transformers_llama():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    inv_freq = ropelab.get_method("rope").frequencies(16, 1e4).inv_freq
    cos, sin = cos_sin(torch.arange(11), inv_freq)
    want_q, want_k = llama_apply(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k, rtol=0, atol=0)


def brute_force_rotation(x, positions, inv_freq, pairs):
    """Rotate each (a, b) index pair by position·θ with an explicit 2×2 matrix, float64."""
    out = x.double().clone()
    for p_idx, p in enumerate(positions.tolist()):
        for i, (a, b) in enumerate(pairs):
            ang = p * inv_freq[i].item()
            c, s = math.cos(ang), math.sin(ang)
            xa, xb = x[..., p_idx, a].double(), x[..., p_idx, b].double()
            out[..., p_idx, a] = c * xa - s * xb
            out[..., p_idx, b] = s * xa + c * xb
    return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 8), (12, 8), (10, 4)])
def test_layouts_and_partial_rotary_against_brute_force(layout, head_dim, rotary_dim):
    torch.manual_seed(1)
    x = torch.randn(2, 5, head_dim, dtype=torch.float64)
    positions = torch.tensor([0, 3, 17, 1000, 65536])
    inv_freq = ropelab.get_method("ntk", scale=3).frequencies(rotary_dim, 500.0).inv_freq
    half = rotary_dim // 2
    pairs = [(i, i + half) for i in range(half)] if layout == "half" else [(2 * i, 2 * i + 1) for i in range(half)]
    cos, sin = cos_sin(positions, inv_freq, layout=layout, dtype=torch.float64)
    got = apply_rotary(x, cos, sin, layout=layout)
    torch.testing.assert_close(got, brute_force_rotation(x, positions, inv_freq, pairs), rtol=0, atol=1e-12)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # pass-through dims untouched


def test_attention_factor_scales_cos_and_sin():
    inv_freq = ropelab.get_method("rope").frequencies(8, 1e4).inv_freq
    c1, s1 = cos_sin(torch.arange(7), inv_freq, dtype=torch.float64)
    c2, s2 = cos_sin(torch.arange(7), inv_freq, attention_factor=1.25, dtype=torch.float64)
    torch.testing.assert_close(c2, 1.25 * c1, rtol=1e-15, atol=0)
    torch.testing.assert_close(s2, 1.25 * s1, rtol=1e-15, atol=0)


def test_angles_exact_at_one_million_positions():
    """cos/sin at 2^20 within 1e-6 rad of a float64 reference; float32 products are not."""
    position = 1_048_576
    inv_freq = ropelab.get_method("rope").frequencies(128, 1e4).inv_freq
    cos, sin = cos_sin(torch.tensor([position]), inv_freq, layout="half")  # float32 tables
    half = 64
    recovered = torch.atan2(sin[0, :half].double(), cos[0, :half].double())
    reference = torch.tensor([math.remainder(position * f, 2 * math.pi) for f in inv_freq.tolist()], dtype=torch.float64)
    error = torch.remainder(recovered - reference + math.pi, 2 * math.pi) - math.pi
    assert error.abs().max().item() < 1e-6
    # the naive float32 product (what a float32 pipeline computes) is far off: the test can fail
    naive = (torch.tensor([position], dtype=torch.float32)[:, None] * inv_freq.float())[0]
    naive_err = torch.remainder(naive.double() - reference + math.pi, 2 * math.pi) - math.pi
    assert naive_err.abs().max().item() > 1e-3


def test_sinusoidal_table_matches_vaswani():
    d_model, positions = 12, torch.tensor([0, 1, 5, 333])
    table = sinusoidal_table(positions, ropelab.get_method("sinusoidal").frequencies(d_model).inv_freq, dtype=torch.float64)
    for row, p in enumerate(positions.tolist()):
        for i in range(d_model // 2):
            omega = 10000 ** (-2 * i / d_model)
            assert table[row, 2 * i].item() == pytest.approx(math.sin(p * omega), abs=1e-12)
            assert table[row, 2 * i + 1].item() == pytest.approx(math.cos(p * omega), abs=1e-12)


def test_sinusoidal_accepts_frequency_maps():
    plain = ropelab.get_method("sinusoidal").frequencies(16).inv_freq
    scaled = ropelab.get_method("sinusoidal", frequency_method=ropelab.get_method("linear", scale=4)).frequencies(16).inv_freq
    torch.testing.assert_close(scaled, plain / 4, rtol=1e-15, atol=0)


def test_bad_layout_and_rotary_dim_are_refused():
    inv_freq = ropelab.get_method("rope").frequencies(8, 1e4).inv_freq
    with pytest.raises(ValueError, match="layout='spiral'"):
        cos_sin(torch.arange(3), inv_freq, layout="spiral")
    cos, sin = cos_sin(torch.arange(3), inv_freq)
    with pytest.raises(ValueError, match="rotary_dim=8"):
        apply_rotary(torch.randn(3, 6), cos, sin)
