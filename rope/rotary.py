"""Rotation kernels shared by every method: cos/sin tables and applying the rotation.

Angles are computed in float64 (position × frequency) and only then cast: in float32 the
product at position 2^20 is off by ~0.06 rad, which is a different position entirely.

Layouts (docs/methods.md): `half` pairs dimension i with i + d/2 (HF Llama's
`rotate_half`); `interleaved` pairs 2i with 2i+1 (GPT-J, Cohere, GLM). With partial rotary
(GPT-NeoX, Phi, StableLM) only the first `rotary_dim` dimensions are rotated; the rest pass
through untouched.
"""

from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["half", "interleaved"]
LAYOUTS = ("half", "interleaved")


def angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """positions (...,) × inv_freq (d/2,) -> angles (..., d/2), float64."""
    return positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    layout: Layout = "half",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (..., d) for `positions`, laid out for `apply_rotary`.

    `attention_factor` multiplies both (YaRN's mscale), as transformers does.
    """
    theta = angles(positions, inv_freq)  # (..., d/2)
    if layout == "half":
        theta = torch.cat((theta, theta), dim=-1)
    elif layout == "interleaved":
        theta = theta.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"layout={layout!r}: must be one of {LAYOUTS}")
    return (theta.cos() * attention_factor).to(dtype), (theta.sin() * attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout = "half") -> torch.Tensor:
    """Rotate the first cos.shape[-1] dimensions of x (..., D); pass the rest through.

    cos/sin broadcast against x[..., :rotary_dim], e.g. (T, d) against (B, H, T, D).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {LAYOUTS}")
    rotary_dim = cos.shape[-1]
    if rotary_dim > x.shape[-1] or rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_dim}: must be even and <= the head dimension {x.shape[-1]}")
    rotate = rotate_half if layout == "half" else rotate_interleaved
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


def sinusoidal_table(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vaswani et al.'s absolute encoding (..., d_model): PE(p, 2i) = sin(p·ω_i), PE(p, 2i+1) = cos(p·ω_i)."""
    theta = angles(positions, inv_freq)
    return torch.stack((theta.sin(), theta.cos()), dim=-1).flatten(-2).to(dtype)
