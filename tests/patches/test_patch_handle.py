"""patch / undo / patched / describe: reversible bit for bit, transactional, refusing what it
cannot do, and never silently a no-op."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers

import ropelab
import ropelab.patches as P
from ropelab.patches import architectures as arch
from ropelab.patches import attention_fn as afn
from ropelab.patches import routes as R
from ropelab.patches.changes import Changes
from tiny_models import build, logits, tokens

SPECS = ["ntk:scale=4", "yarn:scale=2", "rerope:window=4,logn=true", "dynamic-ntk:scale=2"]


def snapshot(model):
    """Everything a patch may touch: logits, every buffer and parameter, config, dispatch."""
    return {
        "logits": logits(model, tokens(40)),
        "tensors": {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "buffer_ids": {k: id(v) for k, v in model.named_buffers()},
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
        "instance_attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "routes": sum(m in afn.ROUTES for m in model.modules()),
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert torch.equal(after["logits"], before["logits"])
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after["buffer_ids"] == before["buffer_ids"]
    assert after["config"] == before["config"]
    assert after["attn"] == before["attn"]
    assert after["instance_attrs"] == before["instance_attrs"]
    assert after["routes"] == 0
    assert P.describe(model).startswith("no ropelab patch")


@pytest.mark.parametrize("family", ["llama", "gemma3", "falcon", "glm"])
@pytest.mark.parametrize("spec", SPECS)
def test_undo_restores_the_model_bit_for_bit(family, spec):
    model = build(family)
    before = snapshot(model)
    handle = P.patch(model, spec)
    assert not torch.equal(logits(model, tokens(40)), before["logits"])
    handle.undo()
    assert_untouched(model, before)
    handle.undo()  # a second undo does nothing
    assert_untouched(model, before)


def test_patched_context_manager_undoes_even_on_error():
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(KeyError), P.patched(model, "rerope", window=4) as handle:
        assert P.describe(model) == handle.describe()
        raise KeyError("boom")
    assert_untouched(model, before)


def test_double_patch_is_refused_naming_the_current_patch():
    model = build("llama")
    with P.patched(model, "rerope", window=4):
        with pytest.raises(RuntimeError, match=r"already patched.*rerope.*window=4"):
            P.patch(model, "ntk", scale=2)
    P.patch(model, "ntk", scale=2).undo()  # allowed again once undone


def test_describe_names_method_route_and_sites():
    model = build("gemma3")
    assert P.describe(model) == "no ropelab patch on Gemma3ForCausalLM"
    with P.patched(model, "self-extend", window=4, group=2):
        text = P.describe(model)
    assert "self-extend" in text and "'ropelab' attention" in text
    assert "sliding_attention: base 10000" in text and "full_attention: base 1e+06" in text
    with P.patched(model, "ntk:scale=2"):
        assert "rotary frequencies rewritten" in P.describe(model)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("ntk",), {"scale": 0.5}, r"scale=0\.5: must be a finite number >= 1"),
        (("rerope",), {}, r"window=<missing>"),
        (("rerope",), {"widow": 4}, r"widow=4: not a parameter.*did you mean 'window'"),
        (("ntkk",), {}, r"method='ntkk': unknown method"),
        (("ntk:scale=abc",), {}, r"value 'abc'"),
        ((None,), {}, r"method=None"),
        ((ropelab.get_method("ntk", scale=2),), {"scale": 3}, r"scale=3: pass parameters either"),
        (("sinusoidal",), {}, r"method='sinusoidal': applies to sinusoidal-position models"),
    ],
)
def test_bad_parameters_raise_before_anything_is_touched(args, kwargs, message):
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        P.patch(model, *args, **kwargs)
    assert_untouched(model, before)


def test_method_object_name_and_spec_forms_agree():
    model = build("llama")
    ids = tokens(40)
    outs = []
    for args, kwargs in [((ropelab.get_method("rerope", window=4),), {}), (("rerope:window=4",), {}), (("rerope",), {"window": 4})]:
        with P.patched(model, *args, **kwargs):
            outs.append(logits(model, ids))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_train_length_comes_from_the_model():
    model = build("llama")
    with P.patched(model, "yarn", scale=2) as handle:
        assert handle.method.train_length == 32
    with P.patched(model, "yarn", scale=2, train_length=16) as handle:  # an explicit one wins
        assert handle.method.train_length == 16


# -- transactional: a failure at any point leaves the model exactly as it was ---------


@pytest.mark.parametrize("spec", ["ntk:scale=4", "rerope:window=4"])
def test_failure_during_the_check_rolls_back(monkeypatch, spec):
    model = build("gemma3")
    before = snapshot(model)
    plan_for = R.plan_for

    def failing_check(model, method, **options):
        def fail():
            raise RuntimeError("injected")

        return dataclasses.replace(plan_for(model, method, **options), check=fail)

    monkeypatch.setattr(R, "plan_for", failing_check)
    with pytest.raises(RuntimeError, match="injected"):
        P.patch(model, spec)
    assert_untouched(model, before)


def test_failure_midway_through_the_changes_rolls_back(monkeypatch):
    """The attention route fails after routes are registered, before the rotary and the
    config are changed."""
    model = build("mistral")
    before = snapshot(model)

    def fail(original, positions):
        raise RuntimeError("injected")

    monkeypatch.setattr(afn, "identity_rotary_forward", fail)
    with pytest.raises(RuntimeError, match="injected"):
        P.patch(model, "rerope", window=4)
    assert_untouched(model, before)
    monkeypatch.undo()
    P.patch(model, "rerope", window=4).undo()


def test_a_patch_that_does_not_take_effect_is_caught(monkeypatch):
    """SelfExtend's failure mode: the attention ignores the dispatch. Falcon computes its own
    attention; declared as an ordinary family, the check must catch that nothing routed."""
    model = build("falcon")
    before = snapshot(model)
    monkeypatch.setitem(arch.FAMILIES, "falcon", arch.Family("FalconAttention", own_dispatch=False))
    with pytest.raises(RuntimeError, match=r"patch check"):
        P.patch(model, "rerope", window=4)
    assert_untouched(model, before)


def test_frequencies_that_do_not_take_effect_are_caught(monkeypatch):
    model = build("llama")
    before = snapshot(model)
    monkeypatch.setattr(Changes, "set_buffer", lambda self, module, name, value: None)
    with pytest.raises(RuntimeError, match=r"did not produce the patched frequencies"):
        P.patch(model, "ntk", scale=4)
    assert_untouched(model, before)


def test_renamed_attention_class_is_not_supported(monkeypatch):
    model = build("llama")
    monkeypatch.setitem(arch.FAMILIES, "llama", arch.Family("LlamaAttentionV2"))
    with pytest.raises(NotImplementedError, match="found no LlamaAttentionV2"):
        P.patch(model, "rerope", window=4)


# -- refusals ---------------------------------------------------------------------------


def test_unsupported_model_lists_supported_families():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(NotImplementedError, match=r"model_type='gpt2'.*supported: .*gemma2.*llama"):
        P.patch(model, "ntk", scale=2)
    assert "llama" in P.supported_families() and "falcon" in P.supported_families()


@pytest.mark.parametrize("version", ["5.24.1", "5.16.1"])
def test_transformers_outside_the_declared_range_is_refused(monkeypatch, version):
    model = build("llama")
    before = snapshot(model)
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"transformers=={re.escape(version)}.*>=5\.17,<5\.24"):
        P.patch(model, "ntk", scale=2)
    assert P.describe(model).startswith("no ropelab patch")
    assert_untouched(model, before)


def test_declared_range_matches_pyproject():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    assert re.sub(r"\s", "", spec) == f"transformers>={arch.TRANSFORMERS_MIN},<{arch.TRANSFORMERS_BELOW}"


def test_a_copy_of_a_patched_model_fails_loudly():
    import copy

    model = build("llama")
    with P.patched(model, "rerope", window=4):
        twin = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="not patched by ropelab"):
        logits(twin, tokens(8))


def test_attention_dispatch_that_does_not_switch_is_caught(monkeypatch):
    """If the model's config is not switched to the ropelab attention, the rotary is an
    identity and the model silently runs without positions: the check must see it."""
    model = build("qwen3")
    before = snapshot(model)
    original = Changes.set_attr

    def skip_dispatch(self, obj, name, value):
        if name != "_attn_implementation_internal":
            original(self, obj, name, value)

    monkeypatch.setattr(Changes, "set_attr", skip_dispatch)
    with pytest.raises(RuntimeError, match=r"layers \[0, 1\] did not go through the ropelab attention"):
        P.patch(model, "dynamic-ntk", scale=2)
    assert_untouched(model, before)


@pytest.mark.parametrize("spec", ["ntk:scale=2", "yarn:scale=2", "rerope:window=8"])
def test_patch_works_in_bfloat16(spec):
    """The probe check allows the model dtype's rounding (a bf16 model was refused before)."""
    model = build("llama").to(torch.bfloat16)
    ids = tokens(40)
    with P.patched(model, spec) as handle:
        out = logits(model, ids)
        assert handle.active and torch.isfinite(out).all()
