"""RULER-style tasks: length fit on the default model's tokenizer, determinism, answers
present where the task says, scoring as RULER scores, chat templates, bad input."""

import argparse
import collections
import re

import pytest

from ropelab.evals.ruler import CPU_TASKS, TASKS, make_sample, make_samples, score
from ropelab.evals.ruler_run import add_parser


@pytest.fixture(scope="module")
def default_tokenizer():
    from transformers import AutoTokenizer

    from ropelab.patches.loading import gguf_path

    path = gguf_path("smollm2-135m")  # the tokenizer alone: no model weights loaded
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [512, 1500])
def test_length_fit_and_answers_in_prompt(default_tokenizer, task, length):
    s = make_sample(default_tokenizer, task, length, depth=0.3, chat_template="off")
    recount = len(default_tokenizer(s.prompt, add_special_tokens=s.add_special_tokens)["input_ids"])
    assert s.tokens == recount <= length
    # tight: one more filler unit would not fit. A unit is one filler sentence group (~20 tokens),
    # one list entry (common-words: 3 uncommon words, ~15 tokens) or 10 coded words (~40 tokens).
    assert length - s.tokens <= 64
    for answer in s.answers:
        assert answer in s.prompt.split("\n\n")[0] or answer in s.prompt


def test_deterministic_and_seeded(default_tokenizer):
    a = make_sample(default_tokenizer, "niah-multikey", 800, 0.5, index=2, seed=3)
    b = make_sample(default_tokenizer, "niah-multikey", 800, 0.5, index=2, seed=3)
    c = make_sample(default_tokenizer, "niah-multikey", 800, 0.5, index=2, seed=4)
    assert a == b and a.prompt != c.prompt


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_depth_places_the_needle(tokenizer, depth):
    s = make_sample(tokenizer, "niah-single", 2000, depth, chat_template="off")
    context = s.prompt[: s.prompt.index("What is")]
    where = context.index(s.answers[0]) / len(context)
    assert abs(where - depth) < 0.05  # filler units are ~90 characters of a context of thousands


def test_multi_needle_tasks_have_their_answers(tokenizer):
    mv = make_sample(tokenizer, "niah-multivalue", 3000, chat_template="off")
    mq = make_sample(tokenizer, "niah-multiquery", 3000, chat_template="off")
    mk = make_sample(tokenizer, "niah-multikey", 3000, chat_template="off")
    assert len(mv.answers) == 4 and len(mq.answers) == 4 and len(mk.answers) == 1
    assert len(re.findall(r"special magic number for", mk.prompt)) == 4 + 2  # 4 needles, the question, the prefix


def test_variable_tracking_chain(tokenizer):
    s = make_sample(tokenizer, "variable-tracking", 3000, depth=0.2, chat_template="off")
    value = re.search(r"assigned the value (\d+)", s.prompt).group(1)
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.prompt))
    holding = {n for n, v in assignments.items() if v == value}
    while True:  # follow the chain by brute force
        more = {n for n, v in assignments.items() if v.startswith("VAR ") and v[4:] in holding} - holding
        if not more:
            break
        holding |= more
    assert holding == set(s.answers) and len(s.answers) == 5


def test_common_and_frequent_words_answers_are_the_counts(tokenizer):
    cwe = make_sample(tokenizer, "common-words", 3000, chat_template="off")
    entries = re.findall(r"^\d+\. (\w+)$", cwe.prompt, flags=re.M)
    counts = collections.Counter(entries).most_common()
    assert {w for w, _ in counts[:10]} == set(cwe.answers) and counts[9][1] > counts[10][1]
    fwe = make_sample(tokenizer, "frequent-words", 3000, chat_template="off")
    text = fwe.prompt.split("\n")[1]
    counts = collections.Counter(text.split()).most_common()
    assert [w for w, _ in counts[:3]] == fwe.answers and counts[2][1] > counts[3][1]


def test_score_is_ruler_string_match():
    assert score("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3, abs=1e-15)
    assert score("APPLE", ["apple"]) == 1.0  # case-insensitive
    assert score("nothing", ["1"]) == 0.0
    assert score("456", ["123", "456"], metric="part") == 1.0
    with pytest.raises(ValueError, match="metric='any'"):
        score("x", ["x"], metric="any")


def test_chat_template(default_tokenizer, tokenizer):
    has = bool(default_tokenizer.chat_template)
    auto = make_sample(default_tokenizer, "passkey", 400, chat_template="auto")
    off = make_sample(default_tokenizer, "passkey", 400, chat_template="off")
    assert auto.chat_template is has and off.chat_template is False
    # plain text is the default (README: the template cost passkey on the default model)
    assert make_sample(default_tokenizer, "passkey", 400) == off
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["ruler"].parse_args(["--out", "x"])
    assert args.chat_template == "off"
    # the default tasks are the screened CPU set (evals/ruler.py CPU_TASKS), every one a task
    assert args.tasks.split(",") == list(CPU_TASKS) and set(CPU_TASKS) <= set(TASKS)
    if has:
        assert auto.prompt != off.prompt and not auto.add_special_tokens and auto.prompt.endswith("The pass key is")
    with pytest.raises(ValueError, match="chat_template='on': this tokenizer has no chat template"):
        make_sample(tokenizer, "passkey", 400, chat_template="on")
    with pytest.raises(ValueError, match="chat_template='maybe'"):
        make_sample(tokenizer, "passkey", 400, chat_template="maybe")


def test_bad_input_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"task='niah-singel'.*did you mean 'niah-single'"):
        make_sample(tokenizer, "niah-singel", 1000)
    with pytest.raises(ValueError, match=r"length=20: task 'niah-single' needs at least \d+ tokens"):
        make_sample(tokenizer, "niah-single", 20)
    with pytest.raises(ValueError, match=r"depth=1.5"):
        make_sample(tokenizer, "niah-single", 1000, depth=1.5)
    with pytest.raises(ValueError, match=r"depth=-0.1"):
        make_samples(tokenizer, ["niah-single"], [1000], depths=[0.5, -0.1])
    with pytest.raises(ValueError, match="did you mean"):
        make_samples(tokenizer, ["niah-single", "varible-tracking"], [1000])


def test_make_samples_grid(tokenizer):
    grid = make_samples(tokenizer, ["passkey", "common-words"], [1500, 2000], depths=[0.1, 0.9], samples=2)
    # passkey: 2 lengths x 2 depths x 2; common-words has no depth: 2 lengths x 2
    assert len(grid) == 8 + 4
    assert {s.depth for s in grid if s.task == "common-words"} == {None}
    assert len({s.prompt for s in grid}) == len(grid)
