"""The FlexAttention backend (rope/kernels/flex.py) in eager mode on the CPU against the
float64 reference, every method, with grouped-query heads, left padding, sliding windows
and soft-capping. Tolerance as in test_attention.py (float32 inputs, float32 kernel: a few
1e-7 measured there; 1e-5 leaves margin, while a key one position off moves outputs by
1e-2 or more)."""

from __future__ import annotations

import warnings

import pytest
import torch

import ropelab
from ropelab.attention import choose_backend, rotary_attention
from ropelab.kernels import flex
from ropelab.kernels.plan import build_plan

from .test_attention import TOL, freqs, inputs, left_padding, reference

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")
SPECS = ["rope", "rerope:window=5", "leaky-rerope:window=6,scale=3,logn=true,train_length=16",
         "self-extend:window=8,group=3"]


def check(spec, T, **kw):
    method = ropelab.parse_method(spec)
    q, k, v = inputs(B=2, H=4, Hkv=2, T=T, S=37)
    inv_freq, factor = freqs(method, 16, 37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": eager on purpose
        out = rotary_attention(q, k, v, method, inv_freq, attention_factor=factor, backend="flex", **kw)
    exact = reference(q, k, v, method, inv_freq, attention_factor=factor, **kw)
    assert (out.double() - exact).abs().max().item() <= TOL


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("T", [37, 4, 1])
def test_flex_matches_the_reference(spec, T):
    mask, offsets = left_padding(2, 37, [0, 11])
    check(spec, T)
    check(spec, T, sliding_window=13, softcap=2.0)
    check(spec, T, key_padding_mask=mask, position_offset=offsets)


def test_flex_is_chosen_on_cuda_without_flash_attn(monkeypatch):
    method = ropelab.parse_method("rerope:window=5")
    q, k, v = inputs(T=4, S=10)
    plan = build_plan(q, k, v, method, freqs(method, 16, 10)[0])
    from ropelab.kernels import flash_attn

    monkeypatch.setattr(flash_attn, "installed", lambda: False)
    assert choose_backend(plan) == "cpu"  # CPU tensors: the CPU kernel
    monkeypatch.setattr(flex, "usable", lambda plan: True)  # as on CUDA with FlexAttention present
    assert choose_backend(plan) == "flex"
