"""The kernel's layout (issue 9): one immutable plan, backends that run it, no import cycle
and no private name crossing modules, far-key rotation a property of the method, and kept
(pre-rotated) keys giving the same result as rotating in the call."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import ropelab
from ropelab.attention import rotary_attention
from ropelab.kernels.merge import merge_into
from ropelab.kernels.plan import build_plan, rotate_key_forms

from .test_attention import freqs, inputs, left_padding

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted((ROOT / "rope" / "kernels").glob("*.py")) + [ROOT / "rope" / "attention.py",
                                                                   ROOT / "patches" / "key_cache.py"]


def test_plan_is_immutable_and_lists_its_parts():
    method = ropelab.parse_method("self-extend:window=8,group=3")
    q, k, v = inputs(T=37, S=37)
    plan = build_plan(q, k, v, method, freqs(method, 16, 37)[0], sliding_window=20, softcap=3.0)
    assert [(p.name, p.lo, p.hi) for p in plan.parts] == [("near", 0, 8), ("far", 8, 20)]
    assert (plan.sliding_window, plan.softcap, plan.scale) == (20, 3.0, 16**-0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scale = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.parts[0].lo = 1


def test_no_private_name_crosses_a_module_and_no_cycle():
    for path in KERNEL_FILES:
        tree = ast.parse(path.read_text())
        modules = set()  # names bound to imported modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                assert not private, (path.name, node.module, private)
                if node.module is None or node.module in ("kernels",):  # from . import x: x is a module
                    modules.update(a.asname or a.name for a in node.names)
            if isinstance(node, ast.Import):
                modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private or node.value.id == "torch", (path.name, node.value.id, node.attr)
    # kernels never import the public entry point back (the cycle flash_cuda.py had)
    for path in (ROOT / "rope" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = {a.name for a in node.names}
                assert target not in ("..attention", "ropelab.attention") and not (
                    target == ".." and "attention" in names), (path.name, target)


@pytest.mark.parametrize("spec,rotated", [("rerope:window=4", False), ("leaky-rerope:window=4,scale=2", True),
                                          ("self-extend:window=4,group=2", True)])
def test_far_key_rotation_is_a_property_of_the_method(spec, rotated):
    rel = ropelab.parse_method(spec).relative
    assert rel.far_keys_rotated is rotated
    # ... and it agrees with the position map: unrotated far keys sit at position 0 everywhere
    positions = torch.arange(0, 5000, 7)
    assert bool((rel.far_key_position(positions) == 0).all()) is not rotated


@pytest.mark.parametrize("spec", ["rope:logn=true,train_length=8", "rerope:window=5", "leaky-rerope:window=5,scale=3",
                                  "self-extend:window=6,group=4"])
@pytest.mark.parametrize("T", [1, 4])
def test_kept_keys_give_the_same_attention(spec, T):
    method = ropelab.parse_method(spec)
    q, k, v = inputs(T=T, S=40)
    mask, offsets = left_padding(2, 40, [0, 7])
    inv_freq = freqs(method, 16, 40)[0]
    positions = torch.arange(40)[None] + offsets[:, None]
    forms = rotate_key_forms(method, inv_freq, 1.0, "half", k, positions)
    kw = dict(position_offset=offsets, key_padding_mask=mask, sliding_window=30)
    # the same rotation code on the same positions: equal to the last bit
    assert torch.equal(rotary_attention(q, k, v, method, inv_freq, key_forms=forms, **kw),
                       rotary_attention(q, k, v, method, inv_freq, **kw))


def test_key_forms_are_validated():
    method = ropelab.parse_method("leaky-rerope:window=5,scale=3")
    q, k, v = inputs(T=1, S=40)
    inv_freq = freqs(method, 16, 40)[0]
    forms = rotate_key_forms(method, inv_freq, 1.0, "half", k, torch.arange(40)[None].expand(2, 40))
    with pytest.raises(ValueError, match=r"^key_forms=\['near'\]: must hold exactly the forms \['far', 'near'\]"):
        rotary_attention(q, k, v, method, inv_freq, key_forms={"near": forms["near"]})
    with pytest.raises(ValueError, match=r"^key_forms\['far'\]="):
        rotary_attention(q, k, v, method, inv_freq, key_forms={**forms, "far": forms["far"][:, :, 1:]})


def test_half_precision_merge_in_place_is_within_one_ulp_of_float32():
    g = torch.Generator().manual_seed(0)
    o1, o2 = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(2))
    l1, l2 = (torch.randn(2, 3, 50, generator=g) * 3 for _ in range(2))
    exact = o1.clone()
    merge_into(exact, l1, o2, l2)
    half = o1.bfloat16()
    merge_into(half, l1, o2.bfloat16(), l2)
    # inputs rounded to bfloat16 (2^-9 relative each), then two roundings in the merge
    ulp = 2.0**-8 * exact.abs().clamp(min=2.0**-8)
    assert ((half.float() - exact).abs() <= 2 * ulp + (o1 - o1.bfloat16().float()).abs().max()).all()
