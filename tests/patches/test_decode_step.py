"""What the layers of one decoding step share (patches/attention_fn.py `Step`, kernels/plan.py
`StepPlan`, kernels/tables.py `Rows`): the first layer plans, the others reuse its plan and
its rows' cos/sin. Oracle: the same patched model with sharing switched off
(`STEP_ROWS = 0`, every layer plans for itself, as before sharing existed); the shared
path does the same arithmetic in the same order, so the logits must be bit-identical
(torch.equal, no tolerance). Uses the 2-layer Llama from tiny_models.
"""

import pytest
import torch
from transformers import DynamicCache

import ropelab.patches as P
import ropelab.patches.attention_fn as afn
from ropelab.kernels import cpu
from ropelab.kernels.plan import build_plan, rotate_key_forms, step_plan
from ropelab.kernels.tables import Rows, cos_sin_rows, rotate_rows
from ropelab.spec import parse_method
from tiny_models import build, left_pad, tokens

SPECS = ["rerope:window=8", "leaky-rerope:window=8,scale=4", "self-extend:window=8,group=4",
         "rerope:window=8,logn=true"]


def _step(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True, attention_mask=mask).logits


def _decode(model, spec, key_cache="kept"):
    """Prefill 20 tokens, decode 8; crop 3 and decode 3 other tokens at the same positions."""
    ids, other = tokens(28), tokens(28, seed=5)
    with P.patched(model, spec, key_cache=key_cache):
        cache = DynamicCache(config=model.config)
        out = [_step(model, ids[:, :20], cache)]
        out += [_step(model, ids[:, t : t + 1], cache) for t in range(20, 28)]
        cache.crop(-3)  # the same positions and shapes again, other keys: a step must not be stale
        out += [_step(model, other[:, t : t + 1], cache) for t in range(25, 28)]
    return torch.cat(out, 1)


@pytest.mark.parametrize("key_cache", ["kept", "lean"])
@pytest.mark.parametrize("spec", SPECS)
def test_sharing_a_step_across_layers_is_bit_identical(monkeypatch, spec, key_cache):
    model = build("llama")
    plans = []
    monkeypatch.setattr(afn, "build_plan", lambda *a, **k: plans.append(1) or build_plan(*a, **k))
    shared = _decode(model, spec, key_cache)
    # one plan per forward, not one per layer (2): the patch's probe, the prefill, 8 steps;
    # the 3 steps re-decoded after the crop find theirs again (same positions and shapes)
    assert len(plans) == 1 + 1 + 8
    monkeypatch.setattr(afn, "STEP_ROWS", 0)
    assert torch.equal(shared, _decode(model, spec, key_cache))


def test_padding_reorder_and_batch_selection_match_planning_each_layer(monkeypatch):
    # a left-padded batch, a padding mask that changes between calls of equal shapes, and
    # the cache's batch operations: steps are found by values, so none is stale
    model = build("llama")
    ids, mask, _ = left_pad([tokens(30, seed=2)[0], tokens(22, seed=3)[0]])
    other_mask = mask.clone()
    other_mask[0, :3] = 0

    def run():
        with P.patched(model, "self-extend:window=8,group=4"):
            cache = DynamicCache(config=model.config)
            out = [_step(model, ids[:, :24], cache, mask[:, :24])]
            out += [_step(model, ids[:, t : t + 1], cache, mask[:, : t + 1]) for t in range(24, 27)]
            cache.crop(-1)
            out.append(_step(model, ids[:, 26:27], cache, other_mask[:, :27]))
            cache.reorder_cache(torch.tensor([1, 0]))
            out.append(_step(model, ids.flip(0)[:, 27:28], cache, mask.flip(0)[:, :28]))
            cache.batch_select_indices(torch.tensor([1]))
            out.append(_step(model, ids[:1, 28:29], cache, mask[:1, :29]).expand(2, -1, -1))
        return torch.cat(out, 1)

    shared = run()
    monkeypatch.setattr(afn, "STEP_ROWS", 0)
    assert torch.equal(shared, run())


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_rotate_exactly_as_rotate_rows(layout, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    cos, sin = cos_sin_rows(torch.tensor([[5, 8000, 123457]]), inv_freq, 0.9, dtype)
    rows = Rows.of(cos, sin, layout)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4, 3, 32, generator=g) * 10).to(dtype)
    assert torch.equal(rows.rotate(x), rotate_rows(x, cos, sin, layout, dtype))
    wide = (torch.randn(1, 4, 3, 40, generator=g) * 10).to(dtype)  # partial rotary: the rest passes through
    assert torch.equal(rows.rotate(wide), rotate_rows(wide, cos, sin, layout, dtype))
    scale = torch.tensor([[1.0, 1.5, 2.0]], dtype=torch.float64)
    assert torch.equal(rows.rotate(x, scale), rotate_rows(x, cos, sin, layout, dtype, scale))


def test_a_step_plan_on_another_layer_equals_that_layers_own_plan():
    method = parse_method("leaky-rerope:window=8,scale=4")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    g = torch.Generator().manual_seed(0)

    def layer():
        q, k, v = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g), \
            torch.randn(2, 2, 30, 16, generator=g)
        forms = rotate_key_forms(method, inv_freq, 1.0, "half", k, torch.arange(30)[None] + torch.tensor([[3], [7]]))
        return q, k, v, forms

    (q0, k0, v0, f0), (q1, k1, v1, f1) = layer(), layer()
    kwargs = dict(position_offset=torch.tensor([3, 7]), scale=0.3)
    shared = step_plan(build_plan(q0, k0, v0, method, inv_freq, key_forms=f0, **kwargs))
    own = build_plan(q1, k1, v1, method, inv_freq, key_forms=f1, **kwargs)
    assert torch.equal(cpu.run(shared.on(q1, k1, v1, f1)), cpu.run(own))
    with pytest.raises(ValueError, match=r"^key.shape=\(2, 2, 31, 16\): must be shaped, typed and placed like"):
        shared.on(q1, torch.zeros(2, 2, 31, 16), torch.zeros(2, 2, 31, 16))
    with pytest.raises(ValueError, match=r"^key_forms\['far'\]=None: must be a tensor shaped"):
        shared.on(q1, k1, v1, {"near": f1["near"]})
