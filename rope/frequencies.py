"""Frequency maps as pure functions: (dim, base, ...) -> inverse frequencies.

Every function returns float64 so that angles stay exact at long range; callers cast
when they build cos/sin tables. Formulas and sources are in docs/methods.md:

- rope:        θ_i = b^(-2i/d)                              (Su et al., RoFormer)
- linear (PI): θ_i / s                                      (Chen et al. 2023, arXiv 2306.15595)
- ntk:         base b·s^(d/(d-2))                           (bloc97; YaRN paper eq. 16)
- ntk-old:     base b·s                                     (Su, Transformer升级之路 10)
- beta-base:   θ_i·exp(-a·(i+1)^β), a·(d/2)^β = ln s        (Su, Transformer升级之路 11)
- dynamic-ntk: ntk with s_eff = max(1, α·l/L - (α-1))       (emozilla; HF `dynamic`)
- yarn:        NTK-by-parts ramp in the pair index          (Peng et al. 2023, arXiv 2309.00071)
- llama3:      per-wavelength blend of θ and θ/s            (Meta Llama 3.1; HF `llama3`)
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """θ_i = base^(-2i/dim) for i = 0 … dim/2-1, shape (dim/2,), float64."""
    exponents = torch.arange(0, dim, 2, dtype=F64) / dim
    return base ** (-exponents)


def linear_inv_freq(dim: int, base: float, scale: float) -> torch.Tensor:
    return rope_inv_freq(dim, base) / scale


def ntk_inv_freq(dim: int, base: float, scale: float) -> torch.Tensor:
    # The exponent d/(d-2) makes the lowest frequency exactly θ_{d/2-1}/s.
    return rope_inv_freq(dim, base * scale ** (dim / (dim - 2)))


def ntk_old_inv_freq(dim: int, base: float, scale: float) -> torch.Tensor:
    return rope_inv_freq(dim, base * scale)


def beta_base_coefficient(dim: int, scale: float, beta: float) -> float:
    """a in exp(-a·(i+1)^β), fixed by a·(d/2)^β = ln s so the last pair is scaled by 1/s."""
    return math.log(scale) / (dim / 2) ** beta


def beta_base_inv_freq(dim: int, base: float, scale: float, beta: float) -> torch.Tensor:
    a = beta_base_coefficient(dim, scale, beta)
    pair_number = torch.arange(1, dim // 2 + 1, dtype=F64)  # i + 1, as in Su's patch
    return rope_inv_freq(dim, base) * torch.exp(-a * pair_number**beta)


def dynamic_ntk_effective_scale(scale: float, seq_len: int, train_length: int) -> float:
    """s_eff = max(1, α·l/L - (α-1)); 1 while the sequence fits the training length."""
    return max(1.0, scale * seq_len / train_length - (scale - 1.0))


def dynamic_ntk_inv_freq(dim: int, base: float, scale: float, seq_len: int, train_length: int) -> torch.Tensor:
    return ntk_inv_freq(dim, base, dynamic_ntk_effective_scale(scale, seq_len, train_length))


def yarn_default_attention_factor(scale: float) -> float:
    """0.1·ln s + 1 (YaRN paper eq. 22); 1 for s ≤ 1. Multiplies cos and sin, so logits by its square."""
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0


def yarn_correction_dim(rotations: float, dim: int, base: float, train_length: int) -> float:
    """The (fractional) pair dimension whose wavelength fits `rotations` turns in the training length."""
    return dim * math.log(train_length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_bounds(dim: int, base: float, train_length: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    low = math.floor(yarn_correction_dim(beta_fast, dim, base, train_length))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, base, train_length))
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(
    dim: int, base: float, scale: float, train_length: int, beta_fast: float = 32.0, beta_slow: float = 1.0
) -> torch.Tensor:
    """NTK-by-parts. Like the yarn repository and transformers, the ramp is linear in the pair
    index between the bounds of `yarn_ramp_bounds` (the paper writes it in terms of wavelength)."""
    low, high = yarn_ramp_bounds(dim, base, train_length, beta_fast, beta_slow)
    if low == high:
        high += 0.001  # both references nudge it the same way to avoid a division by zero
    theta = rope_inv_freq(dim, base)
    ramp = ((torch.arange(dim // 2, dtype=F64) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: keep θ (high frequencies, extrapolate); ramp = 1: θ/s (low frequencies, interpolate)
    return theta / scale * ramp + theta * (1 - ramp)


def llama3_inv_freq(
    dim: int, base: float, scale: float, train_length: int, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0
) -> torch.Tensor:
    theta = rope_inv_freq(dim, base)
    wavelength = 2 * math.pi / theta
    smooth = (train_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * theta / scale + smooth * theta
    out = torch.where(wavelength > train_length / low_freq_factor, theta / scale, blended)
    return torch.where(wavelength < train_length / high_freq_factor, theta, out)
