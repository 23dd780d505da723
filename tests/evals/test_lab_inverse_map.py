"""The inverse Leaky ReRoPE (Su, Transformer升级之路 13) as the lab trains with it: ropelab's
attention with autograd recording (the training path) equals a float64 brute force of the
map r' = r (r < w), w + (r - w)·s (r ≥ w), in values and in gradients."""

from __future__ import annotations

import math

import pytest
import torch

import ropelab
from ropelab.attention import rotary_attention


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def brute_force(q, k, v, window, stretch, inv_freq):
    """Every logit built from its mapped distance: q rotated by r'·θ against an unrotated k."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        logits = []
        for j in range(i + 1):
            r = i - j
            mapped = r if r < window else window + (r - window) * stretch
            angle = mapped * inv_freq
            cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
            rotated = q[:, :, i] * cos + rotate_half(q[:, :, i]) * sin
            logits.append((rotated * k[:, :, j]).sum(-1) / math.sqrt(D))
        weights = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, H, i+1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", weights, v[:, :, : i + 1])
    return out


@pytest.mark.filterwarnings("ignore:rotary_attention")  # the autograd path says it is slow
@pytest.mark.parametrize("window, stretch", [(3, 16.0), (1, 4.0), (5, 2.5), (12, 16.0)])
def test_training_attention_equals_float64_reference(window, stretch):
    torch.manual_seed(window)
    B, H, T, D = 2, 2, 12, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    method = ropelab.get_method("inverse-leaky-rerope", window=window, scale=stretch)
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    with torch.enable_grad():
        got = rotary_attention(q, k, v, method, inv_freq)
        want = brute_force(q, k, v, window, stretch, inv_freq)
        # float64 throughout; the angles reach (w + (T-1-w)·s)·θ ≈ 150 rad, where cos/sin of
        # float64 keep ~1e-14 relative accuracy, so 1e-12 bounds rounding with margin
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        grad_out = torch.randn_like(got)
        g_got = torch.autograd.grad(got, (q, k, v), grad_out)
        g_want = torch.autograd.grad(want, (q, k, v), grad_out)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_mapped_distance_and_identities():
    m = ropelab.get_method("inverse-leaky-rerope", window=4, scale=8)
    i = torch.arange(20.0)[:, None]
    j = torch.arange(20.0)[None, :]
    r = i - j
    want = torch.where(r < 4, r, 4 + (r - 4) * 8)
    got = m.mapped_distance(i.expand(20, 20), j.expand(20, 20))
    assert torch.equal(got[r >= 0], want[r >= 0])  # exact: integers times 8 in float64
    # s = 1 is plain RoPE; a stretch below 1 (Su's k > 1) is Leaky ReRoPE, refused here
    assert ropelab.get_method("inverse-leaky-rerope", window=4, scale=1).mapped_distance(
        torch.tensor(9.0), torch.tensor(0.0)) == 9
    with pytest.raises(ValueError, match=r"scale=0.5: must be a finite number >= 1"):
        ropelab.get_method("inverse-leaky-rerope", window=4, scale=0.5)
