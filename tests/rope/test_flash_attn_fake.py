"""The flash-attn backend's own code (rope/kernels/flash_attn.py) run on the CPU against a
fake `flash_attn` module that checks what the real `flash_attn_func` and
`flash_attn_with_kvcache` (flash-attn 2.6.1, flash_attn/flash_attn_interface.py and the
checks of csrc/flash_attn/flash_api.cpp) take and return: (B, n, H, D) layouts with a
contiguous head dim, float16/bfloat16, their keyword names, `cache_leftpad` (B,) int32
contiguous on the keys' device and never without `cache_seqlens`, an (out, lse, probs) or
(out, lse) tuple with lse (B, H, n) float32; left padding is emulated from the kernel's
definition (sequence b's keys start at cache_leftpad[b], its mask is built on those keys
alone). The fake computes in float64 and rounds its output to the input dtype, as the
kernel does; an empty row's lse is given either sign (the real kernel's
value for such rows is not -inf and is not relied on).

Also: no host synchronisation in a decoding step of that path, padded or not (counted with
a TorchDispatchMode), one per forward in a padded prefill, the device-side stop for right
padding in decoding, the version check and flash-attn 3's refusal by name.
Tolerance: bfloat16 inputs; the yardstick is the CPU kernel's own error on the same
bfloat16 inputs against the float64 reference (2× it plus one bfloat16 ulp of an O(1)
output, 2^-8), the bar issue 9 sets for the GPU.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import sys
import traceback
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ropelab
from ropelab.attention import rotary_attention
from ropelab.kernels import flash_attn
from ropelab.kernels.plan import build_plan, rotate_key_forms

from .test_attention import freqs, inputs, left_padding, reference

M = ropelab.get_method
KEYWORDS = {"dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
            "return_attn_probs"}


KVCACHE_KEYWORDS = {"k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad",
                    "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
                    "alibi_slopes", "num_splits", "return_softmax_lse"}


def _attend(q, k, v, *, scale, softcap, causal, window_size, empty_lse, leftpad=None):
    """flash-attn's forward in float64: q (B, n, H, D), k/v (B, m, Hkv, D). With `leftpad`,
    sequence b's keys are k[b, leftpad[b]:] and the mask is built on them alone (the
    kernel offsets its key pointer by leftpad[b] and shortens seqlen_k by it: csrc/
    flash_attn/src/block_info.h), so this does not assume where the diagonal lands."""
    B, n, H, D = q.shape
    m, Hkv = k.shape[1], k.shape[2]
    left, right = window_size
    outs, lses = [], []
    for b in range(B):
        start = 0 if leftpad is None else int(leftpad[b])
        qh, kh, vh = (t[b, i:].double().transpose(0, 1) for t, i in ((q, 0), (k, start), (v, start)))
        kh, vh = kh.repeat_interleave(H // Hkv, 0), vh.repeat_interleave(H // Hkv, 0)
        mb = m - start
        logits = (qh @ kh.transpose(-1, -2)) * scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        diagonal = torch.arange(n)[:, None] + mb - n  # bottom-right alignment
        j = torch.arange(mb)[None, :]
        hide = torch.zeros(n, mb, dtype=torch.bool)
        if causal or right >= 0:
            hide |= j > diagonal + max(right, 0)
        if left >= 0:
            hide |= j < diagonal - left
        logits = logits.masked_fill(hide, -math.inf)
        lse = torch.logsumexp(logits, -1)
        outs.append(torch.softmax(logits, -1).nan_to_num(0.0) @ vh)  # an empty row's output is 0
        lses.append(torch.where(torch.isneginf(lse), empty_lse, lse).float())
    return torch.stack(outs).transpose(1, 2).to(q.dtype).contiguous(), torch.stack(lses)


def _check_layout(q, k, v):
    B, n, H, D = q.shape
    m, Hkv = k.shape[1], k.shape[2]
    assert k.shape == (B, m, Hkv, D) and v.shape[:3] == (B, m, Hkv) and H % Hkv == 0
    for t in (q, k, v):
        assert t.dtype in (torch.float16, torch.bfloat16) and t.dtype == q.dtype and t.stride(-1) == 1
        assert t.device == q.device


def fake_module(version="2.6.3", empty_lse=math.inf, calls=None):
    def flash_attn_func(q, k, v, **kw):
        assert set(kw) <= KEYWORDS, set(kw) - KEYWORDS
        assert kw["return_attn_probs"] is True and kw.get("dropout_p", 0.0) == 0.0
        _check_layout(q, k, v)
        if calls is not None:
            calls.append(dict(kw, n=q.shape[1], m=k.shape[1]))
        out, lse = _attend(q, k, v, scale=kw["softmax_scale"], softcap=kw.get("softcap", 0.0),
                           causal=kw.get("causal", False), window_size=kw.get("window_size", (-1, -1)),
                           empty_lse=empty_lse)
        return out, lse, None

    def flash_attn_with_kvcache(q, k_cache, v_cache, **kw):
        # flash-attn >= 2.6.1, flash_attn/flash_attn_interface.py and csrc/flash_attn/flash_api.cpp
        # (mha_fwd_kvcache): the checks the real call makes on what ropelab passes.
        assert set(kw) <= KVCACHE_KEYWORDS, set(kw) - KVCACHE_KEYWORDS
        for name in ("k", "v", "rotary_cos", "rotary_sin", "cache_batch_idx", "block_table", "alibi_slopes"):
            assert kw.get(name) is None, name  # not used by ropelab: the fake does not emulate them
        assert kw.get("return_softmax_lse") is True and kw.get("num_splits", 0) == 0
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1  # the wrapper's own asserts
        q = q if q.stride(-1) == 1 else q.contiguous()  # the wrapper's maybe_contiguous
        _check_layout(q, k_cache, v_cache)
        B, m = q.shape[0], k_cache.shape[1]
        seqlens = kw.get("cache_seqlens")
        if isinstance(seqlens, int):  # the wrapper's torch.full on the caches' device
            seqlens = torch.full((B,), seqlens, dtype=torch.int32, device=k_cache.device)
        leftpad = kw.get("cache_leftpad")
        if leftpad is not None:  # TORCH_CHECKs of mha_fwd_kvcache, and a length >= 0
            assert leftpad.dtype == torch.int32 and leftpad.is_contiguous() and leftpad.shape == (B,)
            assert leftpad.device == k_cache.device
            # Without cache_seqlens, a key length that is a multiple of the kernel's block takes
            # its "even" kernel, which ignores the shift a left pad makes (is_even_MN in
            # csrc/flash_attn/src/flash_fwd_launch_template.h, flash-attn 2.6.1-2.8.3).
            assert seqlens is not None, "cache_leftpad without cache_seqlens"
        if seqlens is not None:
            assert seqlens.dtype == torch.int32 and seqlens.is_contiguous() and seqlens.shape == (B,)
            assert seqlens.device == k_cache.device and int(seqlens.max()) <= m
            # ropelab passes every key: the fake emulates no shorter length
            assert bool((seqlens == m).all()), "cache_seqlens shorter than the cache is not emulated"
        if leftpad is not None:  # keys [leftpad[b], m): a length >= 0
            assert 0 <= int(leftpad.min()) and int(leftpad.max()) <= m
        if calls is not None:
            calls.append(dict(kw, n=q.shape[1], m=k_cache.shape[1], kvcache=True))
        return _attend(q, k_cache, v_cache, scale=kw["softmax_scale"], softcap=kw.get("softcap", 0.0),
                       causal=kw.get("causal", False), window_size=kw.get("window_size", (-1, -1)),
                       empty_lse=empty_lse, leftpad=leftpad)

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # as importlib.util.find_spec expects
    module.__version__ = version
    module.flash_attn_func = flash_attn_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module

@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        monkeypatch.setitem(sys.modules, "flash_attn", fake_module(**kw))
    return install


def _error_pair(method, kw, T, S=37, B=2):
    q, k, v = inputs(B=B, T=T, S=S)
    inv_freq, factor = freqs(method, 16, S)
    kw = dict(kw, attention_factor=factor)
    exact = reference(q, k, v, method, inv_freq, **kw)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    on_fake = rotary_attention(qb, kb, vb, method, inv_freq, backend="flash-attn", **kw)
    on_cpu = rotary_attention(qb, kb, vb, method, inv_freq, backend="cpu" if "softcap" not in kw else "eager", **kw)
    assert on_fake.dtype == torch.bfloat16
    return (on_fake.double() - exact).abs().max().item(), (on_cpu.double() - exact).abs().max().item()


@pytest.mark.parametrize("empty_lse", [math.inf, -math.inf])
@pytest.mark.parametrize("T", [37, 5, 1])
@pytest.mark.parametrize("spec", ["rerope:window=5", "leaky-rerope:window=6,scale=3", "self-extend:window=8,group=3",
                                  "rope"])
def test_wrapper_through_a_fake_flash_attn(fake, empty_lse, T, spec):
    fake(empty_lse=empty_lse)
    method = ropelab.parse_method(spec)
    mask, offsets = left_padding(2, 37, [0, 9])
    deep, deep_offsets = left_padding(2, 37, [4, 33])  # the second sequence: 4 real keys, none far
    for kw in ({}, {"sliding_window": 11, "softcap": 2.0}, {"key_padding_mask": mask, "position_offset": offsets},
               {"key_padding_mask": deep, "position_offset": deep_offsets, "sliding_window": 11, "softcap": 2.0}):
        fake_error, cpu_error = _error_pair(method, kw, T)
        assert fake_error <= 2 * cpu_error + 2**-8, (kw, fake_error, cpu_error)


def test_single_row_decode_sets_no_window_or_causal_edge(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_module(calls=calls))
    method = M("self-extend", window=8, group=3)
    q, k, v = (t.bfloat16() for t in inputs(T=1, S=40))
    rotary_attention(q, k, v, method, freqs(method, 16, 40)[0], backend="flash-attn", sliding_window=20)
    assert len(calls) == 2
    for call in calls:  # flash-attn's grouped-query decode path needs both edges unset
        assert "window_size" not in call and "causal" not in call and call["n"] == 1
    assert sorted(call["m"] for call in calls) == [8, 12]  # the band's keys, the far part's keys


@pytest.mark.parametrize("version", ["2.5.9", "2.6.0", "2.6.0.post1"])
def test_old_flash_attn_is_refused_with_its_version(fake, version):
    # 2.6.0 has `softcap` but not flash_attn_with_kvcache's `cache_leftpad` (added in 2.6.1)
    fake(version=version)
    q, k, v = (t.bfloat16() for t in inputs(T=4, S=10))
    method = M("rope")
    with pytest.raises(RuntimeError, match=rf"^flash_attn.__version__='{version}': ropelab needs flash-attn >= 2.6.1"):
        rotary_attention(q, k, v, method, freqs(method, 16, 10)[0], backend="flash-attn")
    fake(version="2.6.1")
    rotary_attention(q, k, v, method, freqs(method, 16, 10)[0], backend="flash-attn")


def test_flash_attn_3_is_refused_by_name():
    q, k, v = inputs(T=4, S=10)
    method = M("rope")
    with pytest.raises(ValueError, match=r"^backend='flash-attn3': not supported \(flash-attn 3's flash_attn_interface"):
        rotary_attention(q, k, v, method, freqs(method, 16, 10)[0], backend="flash-attn3")


PACKAGE = os.path.dirname(ropelab.__file__) + os.sep


class CountSyncs(TorchDispatchMode):
    """Counts ops that hand a tensor's value to Python or copy it to the host, each with the
    ropelab source line that asked for it. (`aten._assert_async` is not one: on CUDA it
    checks on the device without synchronising, as torch._assert_async documents.)"""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.syncs, self.lines, self.paused = [], [], False

    def _record(self, what):
        self.syncs.append(what)
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        self.lines.append(f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else "?")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func in self.SYNCS:
                self._record(str(func))
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                source = args[1] if func is torch.ops.aten.copy_.default else args[0]
                target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
                if target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu":
                    self._record(f"{func} to cpu")
        return func(*args, **kwargs)


def counted_fake(monkeypatch, counter, calls=None):
    """Install the fake flash_attn with its kernels outside the count (the kernel itself is
    the device's business; what is counted is the wrapper around it)."""
    real = fake_module(calls=calls)

    def uncounted(kernel):
        def call(*args, **kw):
            counter.paused = True
            try:
                return kernel(*args, **kw)
            finally:
                counter.paused = False
        return call

    module = types.ModuleType("flash_attn")
    module.__spec__, module.__version__ = real.__spec__, real.__version__
    module.flash_attn_func = uncounted(real.flash_attn_func)
    module.flash_attn_with_kvcache = uncounted(real.flash_attn_with_kvcache)
    monkeypatch.setitem(sys.modules, "flash_attn", module)


@pytest.mark.parametrize("spec", ["rerope:window=8", "leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4"])
def test_decode_step_on_the_cuda_path_never_synchronises(monkeypatch, spec):
    counter = CountSyncs()
    counted_fake(monkeypatch, counter)
    method = ropelab.parse_method(spec)
    q, k, v = (t.bfloat16() for t in inputs(T=1, S=40))
    inv_freq = freqs(method, 16, 40)[0]
    positions = torch.arange(40)[None].expand(2, 40)
    offset = torch.zeros(2, dtype=torch.long)
    forms = rotate_key_forms(method, inv_freq, 1.0, "half", k[:, :, :39], positions[:, :39], tables=False)
    with counter:
        new = rotate_key_forms(method, inv_freq, 1.0, "half", k[:, :, 39:], positions[:, 39:], tables=False)
        kept = {name: torch.cat((forms[name], new[name]), 2) for name in forms}
        out = rotary_attention(q, k, v, method, inv_freq, position_offset=offset, key_forms=kept,
                               backend="flash-attn")
    assert counter.syncs == []
    exact = reference(q.double(), k.double(), v.double(), method, inv_freq)
    assert (out.double() - exact).abs().max() < 2**-6  # bfloat16 inputs and output


# Decoding against 40 keys, batch 2 left-padded by 3 and 29 keys: with window 8 the second
# sequence's far part holds 3 keys (bfloat16, 4 query heads on 2 key/value heads).
PADDED_DECODE = [({}, [3, 29]), ({"softcap": 2.0}, [3, 29]), ({"sliding_window": 13, "softcap": 2.0}, [0, 29]),
                 ({"sliding_window": 6}, [5, 36]),  # window < band: no far part; 36: only 4 real keys
                 ({}, [0, 34])]  # the second sequence has no far key (its keys 34.. all lie within 8)


@pytest.mark.parametrize("options,pads", PADDED_DECODE)
@pytest.mark.parametrize("spec", ["rope", "rerope:window=8", "leaky-rerope:window=8,scale=4",
                                  "self-extend:window=8,group=4", "string:shift=8,local_window=3"])
def test_padded_decode_step_never_synchronises(monkeypatch, spec, options, pads):
    counter, calls = CountSyncs(), []
    counted_fake(monkeypatch, counter, calls)
    method = ropelab.parse_method(spec)
    q, k, v = (t.bfloat16() for t in inputs(B=2, H=4, Hkv=2, T=1, S=40))
    inv_freq = freqs(method, 16, 40)[0]
    mask, offsets = left_padding(2, 40, pads)
    positions = torch.arange(40)[None] + offsets[:, None]
    forms = rotate_key_forms(method, inv_freq, 1.0, "half", k[:, :, :39], positions[:, :39], tables=False)
    plan_counter = CountSyncs()
    with counter:
        new = rotate_key_forms(method, inv_freq, 1.0, "half", k[:, :, 39:], positions[:, 39:], tables=False)
        kept = {name: torch.cat((forms[name], new[name]), 2) for name in forms}
        with plan_counter:
            plan = build_plan(q, k, v, method, inv_freq, position_offset=offsets, key_padding_mask=mask,
                              key_forms=kept, **options)
        out = flash_attn.run(plan)
    # Building the plan asks one question on the host, and only on the CPU (plan.py skips an
    # all-real mask there, `device.type == "cpu" and bool(mask.all())`); the backend none.
    assert plan_counter.syncs == ["aten._local_scalar_dense.default"], plan_counter.lines
    assert 'device.type == "cpu"' in plan_counter.lines[0], plan_counter.lines
    assert counter.syncs == plan_counter.syncs, counter.lines
    assert calls and all(call.get("kvcache") and "cache_leftpad" in call for call in calls)
    assert all("window_size" not in call and "causal" not in call for call in calls)  # the fast decode path
    exact = reference(q, k, v, method, inv_freq, position_offset=offsets, key_padding_mask=mask, **options)
    eager = rotary_attention(q, k, v, method, inv_freq, position_offset=offsets, key_padding_mask=mask,
                             backend="eager", **options)
    # bfloat16 in and out: the eager backend's own error on the same inputs is the yardstick
    # (2x it plus one bfloat16 ulp of an O(1) output, 2^-8, as for the unpadded path).
    assert (out.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() + 2**-8


def test_padded_prefill_reads_its_mask_once_per_forward(monkeypatch):
    # Several query rows may be right-padded (another backend's case), so the mask is read
    # on the host once; the layers of one forward hand over views of one mask and pay nothing.
    counter = CountSyncs()
    counted_fake(monkeypatch, counter)
    method = M("leaky-rerope", window=8, scale=4)
    q, k, v = (t.bfloat16() for t in inputs(T=40, S=40))
    inv_freq = freqs(method, 16, 40)[0]
    attention_mask, offsets = left_padding(2, 40, [3, 29])
    with counter:
        for _layer in range(3):
            plan = build_plan(q, k, v, method, inv_freq, position_offset=offsets,
                              key_padding_mask=attention_mask[:, :], sliding_window=13, softcap=2.0)
            flash_attn.run(plan)
    in_backend = [line for line in counter.lines if line.startswith(flash_attn.__file__)]
    elsewhere = [line for line in counter.lines if not line.startswith(flash_attn.__file__)]
    assert len(in_backend) == 1 and "bool(_is_left_padding(" in in_backend[0], counter.lines
    # plan.py's CPU-only question, once per layer (see the decode test above)
    assert len(elsewhere) == 3 and all('device.type == "cpu"' in line for line in elsewhere), counter.lines


def test_right_padding_is_stopped_on_the_device_or_refused(fake):
    fake()
    method = M("rerope", window=8)
    inv_freq = freqs(method, 16, 40)[0]
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:39] = False  # right padding, then the decoded token
    for T, error, message in ((1, RuntimeError, r"^key_padding_mask: backend='flash-attn' takes left padding only"),
                              (4, ValueError, r"^key_padding_mask: not left padding; backend='flash-attn' takes")):
        q, k, v = (t.bfloat16() for t in inputs(T=T, S=40))
        with pytest.raises(error, match=message):
            rotary_attention(q, k, v, method, inv_freq, key_padding_mask=mask, backend="flash-attn")


def test_the_counter_sees_synchronisations():
    # The CPU backend's padded path reads its mask on the host (bool(mask.all())) and
    # looks up tables by range (int(aminmax)): the counter must see those.
    method = M("self-extend", window=8, group=4)
    q, k, v = inputs(T=3, S=40)
    mask, offsets = left_padding(2, 40, [0, 5])
    counter = CountSyncs()
    with counter:
        rotary_attention(q, k, v, method, freqs(method, 16, 40)[0], key_padding_mask=mask, position_offset=offsets)
    assert "aten._local_scalar_dense.default" in counter.syncs
