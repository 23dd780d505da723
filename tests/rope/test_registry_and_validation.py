"""Names, parameters and the errors users see: field, value and rule, or "did you mean"."""

import dataclasses

import pytest

import ropelab
from ropelab.spec import parse_int_with_suffix

EXPECTED = {
    "rope", "linear", "ntk", "ntk-old", "beta-base", "dynamic-ntk", "yarn", "llama3",
    "rerope", "leaky-rerope", "self-extend", "sinusoidal", "longrope", "inverse-leaky-rerope",
    "dca", "string", "lm-infinite", "sinks",
}  # fmt: skip


def test_the_whole_family_is_registered():
    assert set(ropelab.methods()) == EXPECTED


def test_methods_are_frozen():
    method = ropelab.get_method("ntk", scale=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.scale = 3


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("linear", {"scale": 0.5}, "scale=0.5: must be a finite number >= 1"),
        ("ntk", {"scale": float("inf")}, "scale=inf"),
        ("ntk", {"scale": "2"}, "scale='2': must be a number"),
        ("yarn", {"scale": 0}, "scale=0"),
        ("beta-base", {"scale": 2, "beta": 1.5}, r"beta=1.5: must be in \[0, 1\]"),
        ("beta-base", {"scale": 2, "beta": -0.1}, r"beta=-0.1"),
        ("rerope", {"window": 0}, "window=0: must be an integer >= 1"),
        ("rerope", {"window": 2.5}, "window=2.5"),
        ("leaky-rerope", {"window": 8, "scale": 0.9}, "scale=0.9"),
        ("self-extend", {"window": 8, "group": 0}, "group=0"),
        ("yarn", {"scale": 2, "beta_fast": 1, "beta_slow": 2}, "beta_fast=1: must be > beta_slow=2"),
        ("yarn", {"scale": 2, "attention_factor": -1}, "attention_factor=-1"),
        ("llama3", {"scale": 2, "low_freq_factor": 4, "high_freq_factor": 2}, "high_freq_factor=2"),
        ("rope", {"train_length": 0}, "train_length=0"),
        ("rope", {"logn": "yes"}, "logn='yes'"),
        ("dynamic-ntk", {"scale": 2, "per_query": 1}, "per_query=1: must be True or False"),
        ("rope", {"base": 0.5}, "base=0.5"),
        ("rerope", {"window": 4, "frequency_method": "ntk"}, "frequency_method='ntk'"),
        ("rerope", {"window": 4, "frequency_method": ropelab.get_method("rerope", window=2)}, "frequency-only"),
        ("rerope", {"window": 4, "frequency_method": ropelab.get_method("ntk", scale=2, logn=True)}, "logn"),
        ("ntk", {"scael": 2}, "scael=2: not a parameter of 'ntk'. did you mean 'scale'"),
        ("rerope", {}, "window=<missing>"),
    ],
)
def test_bad_parameters_name_field_value_and_rule(name, params, message):
    with pytest.raises(ValueError, match=message):
        ropelab.get_method(name, **params)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match=r"method='rerop'.*did you mean 'rerope'.*available: beta-base"):
        ropelab.get_method("rerop", window=3)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        ropelab.register(ropelab.method_class("ntk"))


def test_methods_needing_train_length_say_so():
    with pytest.raises(ValueError, match="train_length=None: method 'yarn' needs"):
        ropelab.get_method("yarn", scale=2).frequencies(64, 1e4)
    assert ropelab.get_method("yarn", scale=2).with_train_length(4096).frequencies(64, 1e4).inv_freq.shape == (32,)


@pytest.mark.parametrize(
    "text",
    [
        "rope",
        "ntk:scale=2",
        "beta-base:scale=12,beta=0.75",
        "rerope:window=4k,logn=true",
        "leaky-rerope:window=512,scale=16,frequency_method=ntk(scale=2)",
        "self-extend:window=1024,group=8,train_length=8192",
        "yarn:scale=4,attention_factor=1.2",
        "sinusoidal:frequency_method=linear(scale=2)",
        "dynamic-ntk:scale=2,per_query=true",
        "rerope:window=64,frequency_method=dynamic-ntk(scale=2,per_query=true)",
    ],
)
def test_spec_round_trip(text):
    method = ropelab.parse_method(text)
    assert ropelab.parse_method(method.spec()) == method


def test_spec_values():
    method = ropelab.parse_method("rerope:window=4k,logn=true")
    assert method.window == 4096 and method.logn is True
    assert parse_int_with_suffix("16k") == 16384 and parse_int_with_suffix("1m") == 1 << 20
    with pytest.raises(ValueError, match="'4q' is not an integer"):
        parse_int_with_suffix("4q")


@pytest.mark.parametrize("bad", ["ntk:scale", "ntk:scale=abc", "rerope:window=(3", "nope:x=1"])
def test_bad_specs_raise_value_error(bad):
    with pytest.raises(ValueError):
        ropelab.parse_method(bad)


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("yarn", {"scale": 2, "beta_fast": "32"}, "beta_fast='32': must be a finite number"),
        ("llama3", {"scale": 2, "low_freq_factor": None}, "low_freq_factor=None: must be a finite number"),
        ("beta-base", {"scale": 2, "beta": float("nan")}, "beta=nan: must be a finite number"),
    ],
)
def test_non_numbers_are_refused_before_comparison(name, params, message):
    with pytest.raises(ValueError, match=message):
        ropelab.get_method(name, **params)
