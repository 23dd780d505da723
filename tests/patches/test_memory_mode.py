"""ropelab.patches.memory: position-wise modules in sequence chunks give the same logits
within float32 rounding on every family, see only `chunk` rows at a time, compose with a
patch and an accelerate hook, and undo exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build, logits, tokens

from ropelab.patches import patch
from ropelab.patches.memory import active_memory_mode, chunked_position_wise, memory_mode

IDS = tokens(48)
CHUNK = 5  # does not divide 48: the last slice is short


def ulp_bound(reference: torch.Tensor, ulps: int = 8) -> float:
    """Chunking changes only the row blocking of the MLP matmuls (BLAS sums in another order),
    through 2 layers: measured ≤ 3.2 float32 ulp of the largest logit on all 16 families; bound 8."""
    return ulps * torch.finfo(torch.float32).eps * reference.abs().max().item()


def instance_state(model) -> list[dict]:
    return [{k: v for k, v in vars(m).items() if k in ("forward", "_old_forward", "_ropelab_chunked")} for m in model.modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_within_float32_rounding_and_exact_undo(family):
    model = build(family)
    expected, before = logits(model, IDS), instance_state(model)
    with memory_mode(model, chunk=CHUNK) as mode:
        assert mode.modules and any(name.endswith(".mlp") for name in mode.modules)
        out = logits(model, IDS)
    torch.testing.assert_close(out, expected, atol=ulp_bound(expected), rtol=0)
    assert instance_state(model) == before
    assert torch.equal(logits(model, IDS), expected)


def test_mlp_sees_at_most_chunk_rows_and_short_inputs_take_the_plain_path():
    model = build("llama")
    rows = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    with chunked_position_wise(model, CHUNK):
        logits(model, IDS)
        assert rows == [5] * 9 + [3]
        rows.clear()
        short = logits(model, IDS[:, :CHUNK])
        assert rows == [CHUNK]
    hook.remove()
    assert torch.equal(short, logits(model, IDS[:, :CHUNK]))  # ≤ chunk tokens: the module's own path, bit for bit


@pytest.mark.parametrize("spec", ["ntk:scale=2", "rerope:window=8", "dynamic-ntk:scale=2"])
def test_composes_with_a_patch(spec):
    model = build("gemma3")  # sliding and global layers, pre/post feed-forward norms
    with patch(model, spec):
        expected = logits(model, IDS)
        with memory_mode(model, chunk=CHUNK):
            out = logits(model, IDS)
    torch.testing.assert_close(out, expected, atol=ulp_bound(expected), rtol=0)


def test_under_accelerate_hooks_chunks_inside_the_hook():
    """A hook on the chunked module itself (a dispatched decoder layer's kind) runs once per
    call, around all chunks; per-leaf hooks (cpu_offload) run per chunk and still give the logits."""
    from accelerate import cpu_offload
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = build("llama")
    expected = logits(model, IDS)
    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, Count())
    hooked_forward = vars(mlp)["forward"]
    with memory_mode(model, chunk=CHUNK):
        assert vars(mlp)["forward"] is hooked_forward and "_old_forward" in vars(mlp)
        out = logits(model, IDS)
    assert Count.calls == 1
    torch.testing.assert_close(out, expected, atol=ulp_bound(expected), rtol=0)
    assert vars(mlp)["forward"] is hooked_forward

    cpu_offload(model, execution_device="cpu")  # every leaf's weights on meta, moved in by its own hook
    with memory_mode(model, chunk=CHUNK):
        out = logits(model, IDS)
    torch.testing.assert_close(out, expected, atol=ulp_bound(expected), rtol=0)
    assert torch.equal(logits(model, IDS), expected)


def test_bad_chunk_and_twice_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match=r"chunk=0: must be an integer >= 1"):
        memory_mode(model, chunk=0)
    with memory_mode(model, chunk=8), pytest.raises(RuntimeError, match="already in force"):
        memory_mode(model, chunk=8)
    assert "_ropelab_chunked" not in vars(model.model.layers[0].mlp)


def test_active_memory_mode_names_the_mode_in_force_until_undone():
    model = build("llama")
    assert active_memory_mode(model) is None and active_memory_mode(None) is None
    mode = memory_mode(model, chunk=8)
    assert active_memory_mode(model) is mode and active_memory_mode(build("llama")) is None
    mode.undo()
    assert active_memory_mode(model) is None


@pytest.mark.slow
def test_smollm2_losses_equal_within_float32_rounding():
    from ropelab.evals.losses import token_losses
    from ropelab.patches import load_default_model

    model, _ = load_default_model("smollm2-135m")
    ids = torch.arange(1024) * 7919 % model.config.vocab_size
    expected = token_losses(model, ids)
    with memory_mode(model, chunk=256):
        out = token_losses(model, ids)
    # 30 layers of reordered float32 sums; losses are O(10) nats: 64 ulp of the largest
    difference = (out - expected).abs().max().item()
    print(f"smollm2-135m, 1024 tokens, chunk 256: largest loss difference {difference:.3g} nats")
    assert difference <= 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
