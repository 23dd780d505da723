"""Spec texts: each parameter once, and one canonical text per method (equal methods give
equal texts; the text parses back to an equal method), checked by hypothesis over every
registered method."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ropelab
from ropelab.method import spec_value
from ropelab.spec import split_top_level

INT_FIELDS = {"window", "group", "train_length", "chunk_size", "local_window", "shift", "n_global", "n_local", "sinks"}  # validated as int: 4.0 is refused, not equal


# -- each parameter once ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("ntk:scale=2,scale=3", r"scale=3: given twice in method spec 'ntk:scale=2,scale=3' \(first scale=2\)"),
        ("dynamic-ntk:scale=2,per_query=true,per-query=false", r"per_query=False: given twice"),
        ("rerope:window=4,frequency_method=ntk(scale=2,scale=2)", r"scale=2: given twice in method spec 'ntk:scale=2,scale=2'"),
        ("rerope:window=4,window=4", r"window=4: given twice"),  # even with the same value
    ],
)
def test_a_parameter_given_twice_in_the_text_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ropelab.parse_method(text)


def test_a_keyword_repeating_a_parameter_of_the_text_is_refused():
    with pytest.raises(ValueError, match=r"scale=3: given both in method spec 'ntk:scale=2' \(scale=2\) and as a keyword"):
        ropelab.parse_method("ntk:scale=2", scale=3)


def test_keywords_add_parameters_the_text_leaves_out():
    assert ropelab.parse_method("ntk", scale=3) == ropelab.get_method("ntk", scale=3)
    assert ropelab.parse_method("rerope:window=4", logn=True) == ropelab.get_method("rerope", window=4, logn=True)


# -- canonical texts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts,canonical",
    [
        (["ntk:scale=2", "ntk:scale=2.0", "ntk:scale=2e0", "ntk: scale = 2 "], "ntk:scale=2"),
        (["rerope:window=4k,logn=true", "rerope:logn=TRUE,window=4096"], "rerope:window=4096,logn=true"),
        (["leaky-rerope:window=8,scale=16", "leaky-rerope:window=8"], "leaky-rerope:window=8"),  # default left out
        (
            ["rerope:window=8,frequency_method=ntk(scale=2.0)", "rerope:frequency_method=ntk(scale=2),window=8"],
            "rerope:window=8,frequency_method=ntk(scale=2)",
        ),
        (["yarn:scale=2.5,attention_factor=1.25"], "yarn:scale=2.5,attention_factor=1.25"),
        (["beta-base:scale=2,beta=0.0", "beta-base:scale=2,beta=-0.0"], "beta-base:scale=2,beta=0"),
    ],
)
def test_equal_methods_written_differently_give_one_text(texts, canonical):
    methods = [ropelab.parse_method(t) for t in texts]
    assert all(m == methods[0] for m in methods)
    assert {m.spec() for m in methods} == {canonical}


def test_spec_values():
    assert [spec_value(v) for v in (2, 2.0, 0.1, True, None, (1, 1.5))] == ["2", "2", "0.1", "true", "none", "[1,1.5]"]
    assert spec_value(1e20) == "100000000000000000000" and spec_value(1e-5) == "1e-05"


# -- property: over every registered method ---------------------------------------------

numbers = st.one_of(st.integers(1, 64), st.floats(1, 64, allow_nan=False, allow_infinity=False))
positive = st.one_of(st.integers(1, 64), st.floats(1e-3, 64, allow_nan=False, allow_infinity=False))
unit = st.one_of(st.integers(0, 1), st.floats(0, 1, allow_nan=False))
ints = st.integers(1, 1 << 20)


@st.composite
def frequency_params(draw, name):
    """Valid parameters of a frequency-only method (no train_length: nested ones take the outer one)."""
    if name == "rope":
        return draw(st.fixed_dictionaries({}, optional={"base": st.one_of(st.integers(2, 10**6), st.floats(1.5, 1e6))}))
    if name in ("linear", "ntk", "ntk-old"):
        return {"scale": draw(numbers)}
    if name == "beta-base":
        return {"scale": draw(numbers), **draw(st.fixed_dictionaries({}, optional={"beta": unit}))}
    if name == "dynamic-ntk":
        return {"scale": draw(numbers), **draw(st.fixed_dictionaries({}, optional={"per_query": st.booleans()}))}
    if name == "yarn":
        slow = draw(positive)
        fast = draw(st.one_of(st.integers(int(slow) + 1, 128), st.floats(float(slow) + 0.5, 128)))
        optional = {"attention_factor": st.one_of(st.none(), positive)}
        return {"scale": draw(numbers), "beta_slow": slow, "beta_fast": fast, **draw(st.fixed_dictionaries({}, optional=optional))}
    if name == "llama3":
        low = draw(positive)
        high = draw(st.one_of(st.integers(int(low) + 1, 128), st.floats(float(low) + 0.5, 128)))
        return {"scale": draw(numbers), "low_freq_factor": low, "high_freq_factor": high}
    if name == "longrope":
        n = draw(st.integers(1, 8))
        factors = st.lists(positive, min_size=n, max_size=n).map(tuple)
        optional = {"scale": numbers, "attention_factor": positive}
        return {"short_factor": draw(factors), "long_factor": draw(factors), **draw(st.fixed_dictionaries({}, optional=optional))}
    raise AssertionError(f"no strategy for {name}")


FREQUENCY_ONLY = ["rope", "linear", "ntk", "ntk-old", "beta-base", "dynamic-ntk", "yarn", "llama3"]
FREQUENCY_ONLY += ["longrope"] if "longrope" in ropelab.methods() else []


@st.composite
def nested(draw):
    name = draw(st.sampled_from(FREQUENCY_ONLY))
    return None if name == "rope" and draw(st.booleans()) else ropelab.get_method(name, **draw(frequency_params(name)))


KEY_RANGE = ["dca", "string", "lm-infinite", "sinks"]


@st.composite
def key_range_params(draw, name):
    """Parameters of a key-range method that pass its rules with any train_length left out."""
    if name == "dca":
        lw = draw(st.integers(0, 64))
        return draw(st.fixed_dictionaries({}, optional={"chunk_size": st.just(2 * lw + 1 + draw(st.integers(0, 99))),
                                                       "local_window": st.just(lw)}))
    if name == "string":
        shift = draw(st.integers(1, 10**4))
        optional = {"shift": st.just(shift), "local_window": st.integers(0, shift),
                    "attention_factor": st.floats(0.5, 2)}
        return draw(st.fixed_dictionaries({}, optional=optional))
    if name == "lm-infinite":
        return draw(st.fixed_dictionaries({}, optional={"n_global": st.integers(0, 100), "n_local": st.integers(1, 10**4)}))
    window = draw(st.integers(1, 10**4))
    return draw(st.fixed_dictionaries({}, optional={"sinks": st.integers(0, window), "window": st.just(window)}))


@st.composite
def method_params(draw):
    """(name, params) of any registered method, with the common fields drawn too."""
    name = draw(st.sampled_from(ropelab.methods()))
    if name in FREQUENCY_ONLY:
        params = draw(frequency_params(name))
    elif name in KEY_RANGE:
        params = {"frequency_method": draw(nested()), **draw(key_range_params(name))}
    else:
        params = {"frequency_method": draw(nested())}
        if name != "sinusoidal":
            params["window"] = draw(ints)
        if name == "leaky-rerope":
            params["scale"] = draw(numbers)
        if name == "self-extend":
            params["group"] = draw(st.integers(1, 64))
        if name == "sinusoidal":
            params["base"] = draw(st.one_of(st.integers(2, 10**6), st.floats(1.5, 1e6)))
    common = {"train_length": st.one_of(st.none(), ints), "logn": st.booleans()}
    if name in KEY_RANGE:  # a training length would put the drawn parameters under its rules
        common = {"logn": st.booleans()}
    return name, {**params, **draw(st.fixed_dictionaries({}, optional=common))}


def twin(params: dict) -> dict:
    """The same values in the other number type where that is equal (2 <-> 2.0)."""

    def flip(key, value):
        if isinstance(value, ropelab.Method):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return type(value)(**twin(fields))
        if isinstance(value, tuple):
            return tuple(flip(key, v) for v in value)
        if key in INT_FIELDS or isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return float(value)
        return int(value) if value.is_integer() else value

    return {k: flip(k, v) for k, v in params.items()}


@settings(max_examples=400, deadline=None)
@given(method_params())
def test_equal_methods_give_equal_texts_and_the_text_parses_back(drawn):
    name, params = drawn
    a = ropelab.get_method(name, **params)
    b = ropelab.get_method(name, **twin(params))
    assert a == b
    assert a.spec() == b.spec()
    back = ropelab.parse_method(a.spec())
    assert back == a and back.spec() == a.spec()


@settings(max_examples=200, deadline=None)
@given(method_params(), st.randoms(use_true_random=False))
def test_parameter_order_in_the_text_does_not_matter(drawn, rnd: random.Random):
    name, params = drawn
    method = ropelab.get_method(name, **params)
    head, _, rest = method.spec().partition(":")
    items = split_top_level(rest) if rest else []
    rnd.shuffle(items)
    assert ropelab.parse_method(head + (":" + ",".join(items) if items else "")).spec() == method.spec()
