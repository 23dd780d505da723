"""Passkey prompts: deterministic, within the length, the key at the depth; scoring; the sweep."""

import contextlib

import pytest

from ropelab.evals.passkey import FILLER, accuracy, make_prompt, passkey, score


def test_prompts_are_deterministic_and_fit(tokenizer):
    a = make_prompt(tokenizer, 400, 0.5, trial=1, seed=3)
    assert a == make_prompt(tokenizer, 400, 0.5, trial=1, seed=3)
    assert len({make_prompt(tokenizer, 400, 0.5, trial=t, seed=3).key for t in range(4)}) > 1  # keys vary
    assert len(a.key) == 5 and a.key.isdigit() and a.key in a.text
    assert 300 < a.tokens <= 400 and a.tokens == len(tokenizer(a.text)["input_ids"])
    early = make_prompt(tokenizer, 400, 0.1, seed=3)
    late = make_prompt(tokenizer, 400, 0.9, seed=3)
    assert early.text.index(early.key) < late.text.index(late.key)
    assert late.text.count(FILLER) == early.text.count(FILLER)


def test_bad_parameters_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="depth=1.5"):
        make_prompt(tokenizer, 400, 1.5)
    with pytest.raises(ValueError, match="length=10"):
        make_prompt(tokenizer, 10, 0.5)


def test_scoring():
    assert score(" 12345. Remember", "12345") == ("12345", True)
    assert score(" 54321", "12345") == ("54321", False)
    assert score(" twelve", "12345") == (None, False)


def test_sweep_records_and_resumes(model, tokenizer, tmp_path):
    def unpatched(model_, method):
        return contextlib.nullcontext(model_)

    kw = dict(depths=(0.2, 0.8), trials=1, seed=0, out=tmp_path, apply_method=unpatched, progress=False)
    records = passkey(model, tokenizer, ["rope", "ntk:scale=0.5"], [256], **kw)
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 2 and all(isinstance(r["correct"], bool) and r["prompt_tokens"] <= 256 for r in ok)
    assert all("scale=0.5" in r["error"] for r in records if r["method"] == "ntk:scale=0.5")
    assert set(accuracy(records)) == {"rope"}
    lines = (tmp_path / "passkey.jsonl").read_text().splitlines()
    passkey(model, tokenizer, ["rope"], [256], **kw)
    assert (tmp_path / "passkey.jsonl").read_text().splitlines() == lines  # nothing redone
