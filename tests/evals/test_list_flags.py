"""Every comma-separated list flag refuses an empty item (`16,,32`, a leading or a trailing comma)
alike: exit 2, one line naming the flag, the value and the rule, before any model loads, and
--out is left as it was."""

from __future__ import annotations

import re

import pytest

from ropelab.evals import cli

OUT = "{out}"
COMMANDS = {
    "eval": ["eval", "--out", OUT],
    "sweep-default": ["sweep-default", "--out", OUT],
    "passkey": ["passkey", "--out", OUT],
    "lm-eval": ["lm-eval", "--out", OUT],
    "ruler": ["ruler", "--tasks", "passkey", "--lengths", "1k", "--out", OUT],
    "tune": ["tune", "--method", "ntk", "--target-length", "1k", "--targets", "16", "--out", OUT],
    "lab eval": ["lab", "eval", "no-run-needed", "--out", OUT],
}
EMPTY_ITEM = [  # (command, flag, value, the item the message names)
    ("eval", "--methods", "rope,,ntk:scale=2", 2),
    ("eval", "--lengths", "16,,32", 2),
    ("sweep-default", "--methods", "rope,", 2),
    ("sweep-default", "--lengths", ",4k,16k", 1),
    ("passkey", "--methods", "rope,,rope", 2),
    ("passkey", "--lengths", "1k,2k,", 3),
    ("passkey", "--depths", "0.1,,0.9", 2),
    ("lm-eval", "--method", "ntk:scale=2,", 2),
    ("lm-eval", "--tasks", "ropelab_passkey,,hellaswag", 2),
    ("lm-eval", "--passkey-lengths", "1k,,2k", 2),
    ("ruler", "--methods", "rope,,yarn:scale=2", 2),
    ("ruler", "--tasks", "passkey,", 2),
    ("ruler", "--lengths", "1k,,2k", 2),
    ("ruler", "--depths", ",0.5", 1),
    ("tune", "--fixed", "beta=0.5,,", 2),
    ("lab eval", "--factors", "1,,4", 2),
    ("lab eval", "--methods", "rope,,ntk:scale=2", 2),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the input must be refused before it."""
    from ropelab.evals import loading, models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


def refused(argv, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    assert cli.main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()  # nothing was written
    return err


@pytest.mark.parametrize("command, flag, value, item", EMPTY_ITEM, ids=[f"{c}{f}" for c, f, _, _ in EMPTY_ITEM])
def test_an_empty_item_is_refused(command, flag, value, item, no_loading, tmp_path, capsys):
    err = refused([*COMMANDS[command], flag, value], tmp_path, capsys)
    assert f"{flag} {value!r}: item {item} is empty; the rule: comma-separated" in err, err


@pytest.mark.parametrize("command", ["eval", "passkey", "ruler", "tune"])
def test_max_memory_refuses_an_empty_item(command, no_loading, tmp_path, capsys):
    err = refused([*COMMANDS[command], "--device-map", "auto", "--max-memory", "cpu=1GiB,,0=2GiB"], tmp_path, capsys)
    assert "--max-memory 'cpu=1GiB,,0=2GiB': '' is not KEY=SIZE; the rule: KEY=SIZE[,KEY=SIZE...]" in err


def test_tune_param_refuses_an_empty_grid_value(no_loading, tmp_path, capsys):
    err = refused([*COMMANDS["tune"], "--param", "scale=1||2"], tmp_path, capsys)
    assert "--param 'scale=1||2': expected name=low:high[:log] or name=v1|v2|..." in err


def test_a_single_length_flag_refuses_a_list(no_loading, tmp_path, capsys):
    err = refused([*COMMANDS["eval"], "--window", "4k,8k"], tmp_path, capsys)
    assert "--window '4k,8k': give one length, like 16k" in err


def test_lm_eval_method_is_one_method(no_loading, tmp_path, capsys):
    err = refused([*COMMANDS["lm-eval"], "--method", "rope,ntk:scale=2"], tmp_path, capsys)
    assert "--method 'rope,ntk:scale=2': give one method" in err


def test_ruler_methods_keep_multi_parameter_specs_together(no_loading, tmp_path, capsys):
    """`ntk:scale=2,logn=true` is one method in every command that takes --methods."""
    err = refused([*COMMANDS["ruler"], "--methods", "rope,ntk:scale=2,logn=true", "--samples", "0"], tmp_path, capsys)
    assert re.search(r"--samples 0: must be an integer >= 1", err), err  # the methods passed; the next check refused
