"""Host synchronisations of the CUDA path's second backend, FlexAttention (rope/kernels/flex.py),
in a padded decoding step, counted as in test_flash_attn_fake.py. What runs here is the CPU
eager path: the backend's own code and `create_block_mask` are counted; the inside of the
`flex_attention` call is not (like the flash-attn kernel there, it is the device's business,
and its eager CPU form compiles itself, which a dispatch mode cannot enter). On CUDA the
block mask and the call are compiled (flex.py), which this cannot show.

Accuracy: against the eager backend on the same plan; float32 inputs and kernels, TOL as in
test_attention.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as fa
from torch.utils._python_dispatch import _disable_current_modes

import ropelab
from ropelab.kernels import eager, flex
from ropelab.kernels.plan import build_plan, rotate_key_forms

from .test_attention import TOL, freqs, inputs, left_padding
from .test_flash_attn_fake import CountSyncs

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")


@pytest.mark.parametrize("options", [{"sliding_window": 13, "softcap": 2.0}])  # each adds to the mask/score_mod
@pytest.mark.parametrize("spec", ["rope", "rerope:window=8", "leaky-rerope:window=8,scale=4",
                                  "self-extend:window=8,group=4", "string:shift=8,local_window=3",
                                  "dca:chunk_size=16,local_window=4", "sinks:sinks=2,window=8"])
def test_padded_flex_decode_step_never_synchronises(monkeypatch, spec, options):
    real = fa.flex_attention

    def outside_the_count(*args, **kw):
        with _disable_current_modes():
            return real(*args, **kw)

    monkeypatch.setattr(fa, "flex_attention", outside_the_count)
    method = ropelab.parse_method(spec)
    q, k, v = inputs(B=2, H=4, Hkv=2, T=1, S=40)
    inv_freq = freqs(method, 16, 40)[0]
    mask, offsets = left_padding(2, 40, [3, 29])
    positions = torch.arange(40)[None] + offsets[:, None]
    forms = rotate_key_forms(method, inv_freq, 1.0, "half", k, positions, tables=False)
    # built outside the count: on the CPU, plan.py reads the mask and a key-range part's
    # extent on the host (its `device.type == "cpu"` branches), which it does not on CUDA
    plan = build_plan(q, k, v, method, inv_freq, position_offset=offsets, key_padding_mask=mask, key_forms=forms,
                      **options)
    counter = CountSyncs()
    with counter, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": eager on purpose
        out = flex.run(plan)
        synced_by_flex = list(counter.syncs)
        float(out.sum())  # control: the counter is still counting after flex_attention's calls
    assert synced_by_flex == [], counter.lines
    assert counter.syncs == ["aten._local_scalar_dense.default"]
    # the exact eager backend on the same plan (tested against float64 in test_attention.py
    # and test_key_range_methods.py)
    assert (out.double() - eager.run(plan).double()).abs().max().item() <= TOL
