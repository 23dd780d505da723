"""The flash-attn (CUDA) path of rotary_attention.

On CPU, `flash_attn_lse` is replaced by an emulation of flash-attn's documented semantics
(`flash_attn_func` docstring, flash-attn 2.6: causal mask aligned to the bottom-right
corner; `window_size=(left, 0)` keeps keys diagonal-left … diagonal; key head h // (H/Hkv)
serves query head h; soft-capping before the softmax; rows with no key return 0) computed
in float64, and `usable` is forced on. The whole path then runs through
`rotary_attention` and is compared with the brute-force reference of test_attention.py,
so the decomposition (which keys each call gets, the alignment, the window edges, the
per-sequence handling of left padding, the merge) is checked here without a GPU. The
emulation returns +inf as the lse of a row with no key, so a path that forgot to fix
those rows would fail.

Where CUDA and flash-attn exist, the real kernel is compared with the CPU kernel in
bfloat16 (marked `gpu`; skipped otherwise).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import ropelab
from ropelab.kernels import flash_attn as flash_cuda
from ropelab.attention import rotary_attention
from ropelab.kernels.plan import build_plan

from .test_attention import METHODS, check, configs, freqs, inputs, left_padding, reference

M = ropelab.get_method


def emulated_flash_attn_lse(q, k, v, *, window_left, scale, softcap, leftpad=None):
    B, H, n, D = q.shape
    m = k.shape[2]
    g = H // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if n == 1 and window_left is not None:  # flash_attn_lse slices a single row's keys to its window
        start = max(0, m - 1 - window_left)
        logits, v, m = logits[..., start:], v[:, :, start:], m - start
        if leftpad is not None:
            leftpad = (leftpad - start).clamp(min=0)
    diagonal = torch.arange(n)[:, None] + m - n  # the key each query row sits on
    j = torch.arange(m)[None, :]
    hide = (j > diagonal)[None]
    if window_left is not None and window_left >= 0:
        hide = hide | (j < diagonal - window_left)[None]
    if leftpad is not None:  # keys [leftpad[b], m) are sequence b's (flash_attn_with_kvcache's cache_leftpad)
        assert leftpad.dtype == torch.int32 and leftpad.shape == (B,)
        hide = hide | (j[None] < leftpad[:, None, None].long())
    logits = logits.masked_fill(hide[:, None], -math.inf)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1).nan_to_num(0.0) @ v
    lse = torch.where(torch.isneginf(lse), math.inf, lse)  # flash-attn's convention for empty rows
    return out.to(q.dtype), lse.float()

calls: list = []


@pytest.fixture
def emulated(monkeypatch):
    def spy(*args, **kw):
        calls.append(kw["window_left"])
        return emulated_flash_attn_lse(*args, **kw)

    calls.clear()
    monkeypatch.setattr(flash_cuda, "usable", lambda *a: True)
    monkeypatch.setattr(flash_cuda, "check_version", lambda: None)
    monkeypatch.setattr(flash_cuda, "flash_attn_lse", spy)
    return calls


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [37, 5, 1])
def test_prefill_and_decoding(emulated, name, T):
    check(METHODS[name](), T=T, S=37)
    relative = name != "rope"
    assert len(emulated) == 1 + relative  # one call per part: no chunks, no masks


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("sliding_window", [3, 8, 20])
def test_sliding_window_and_softcap(emulated, name, sliding_window):
    check(METHODS[name](), sliding_window=sliding_window, softcap=2.0)
    check(METHODS[name](), T=4, sliding_window=sliding_window)


@pytest.mark.parametrize("name", METHODS)
def test_left_padding_per_sequence(emulated, name):
    mask, offsets = left_padding(3, 37, [0, 9, 30])
    check(METHODS[name](), B=3, key_padding_mask=mask, position_offset=offsets)
    check(METHODS[name](), B=3, T=3, key_padding_mask=mask, position_offset=offsets)


def test_other_padding_takes_the_cpu_kernel():
    # Right padding is not left padding: a prefill must not be taken by flash-attn.
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    assert not flash_cuda.left_padded(mask)
    left, _ = left_padding(2, 10, [0, 4])
    assert flash_cuda.left_padded(left)
    assert flash_cuda.left_padded(left[:, :])  # a view of the mask just checked: remembered
    pads = flash_cuda.left_pads(left)
    assert pads.dtype == torch.int32 and pads.tolist() == [0, 4]
    left[0, 5] = False  # a hole, edited in place since checked: read again
    assert not flash_cuda.left_padded(left)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(configs())
def test_random_configurations(emulated, config):
    method, kw = config
    check(method, **kw)


def test_not_usable_on_cpu_or_float32():
    q, k, v = inputs()
    method = M("rope")
    for x in (q, q.bfloat16()):  # float32, and bfloat16 on the CPU
        plan = build_plan(x, k.to(x.dtype), v.to(x.dtype), method, freqs(method, 16, 37)[0])
        assert not flash_cuda.usable(plan)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_cuda.installed()),
                    reason="needs CUDA and flash-attn (pip install ropelab[cuda])")
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [300, 1])
@pytest.mark.parametrize("S", [300, 256])  # 256: key counts a multiple of flash-attn's blocks
def test_real_flash_attn_matches_the_cpu_kernel(monkeypatch, name, T, S):
    real = flash_cuda.flash_attn_lse
    monkeypatch.setattr(flash_cuda, "flash_attn_lse", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    method = {"rope": M("rope"), "rerope": M("rerope", window=64),
              "leaky": M("leaky-rerope", window=64, scale=4),
              "self-extend": M("self-extend", window=64, group=8)}[name]
    q, k, v = inputs(B=2, H=8, Hkv=2, T=min(T, S), S=S, D=64, dtype=torch.bfloat16)
    inv_freq, factor = freqs(method, 64, S)
    mask, offsets = left_padding(2, S, [0, 17])
    for kw in ({}, {"key_padding_mask": mask, "position_offset": offsets}, {"sliding_window": 100}):
        calls.clear()
        on_device = {key: value.cuda() for key, value in kw.items() if isinstance(value, torch.Tensor)}
        on_gpu = rotary_attention(q.cuda(), k.cuda(), v.cuda(), method, inv_freq, attention_factor=factor,
                                  **{**kw, **on_device}).cpu()
        assert calls, "the flash-attn path was not taken"
        on_cpu = rotary_attention(q, k, v, method, inv_freq, attention_factor=factor, **kw)
        exact = reference(q, k, v, method, inv_freq, attention_factor=factor, **kw)
        # Both kernels see the same bfloat16 inputs and round their output to bfloat16, so
        # the CPU kernel's own error against the float64 reference is the yardstick.
        gpu_error = (on_gpu.double() - exact).abs().max().item()
        cpu_error = (on_cpu.double() - exact).abs().max().item()
        assert gpu_error <= 2 * cpu_error + 1e-3, (gpu_error, cpu_error)
