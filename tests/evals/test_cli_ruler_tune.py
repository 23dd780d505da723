"""`ropelab ruler` and `ropelab tune` through `cli.main`: bad input is exit 2, named, before the model loads,
and leaves --out as it was."""

import re

import pytest

from ropelab.evals import cli, models


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


RULER = ["ruler", "--tasks", "passkey", "--lengths", "1k", "--depths", "0.5"]
TUNE = ["tune", "--method", "ntk", "--target-length", "1k", "--targets", "16"]


@pytest.mark.parametrize("argv, message", [
    (RULER + ["--tasks", "paskey"], "--tasks: task='paskey': unknown task; did you mean 'passkey'"),
    (RULER + ["--lengths", "8"], "--lengths '8': length=8 is too short for task 'passkey'"),
    (RULER + ["--lengths", "1q"], "--lengths '1q'"),
    (RULER + ["--depths", "1.5"], "--depths '1.5': depth=1.5 must be between 0 and 1"),
    (RULER + ["--depths", "-0.1"], "depth=-0.1 must be between 0 and 1"),
    (RULER + ["--depths", ","], "--depths ',': give at least one value"),
    (RULER + ["--samples", "0"], "--samples 0: must be an integer >= 1"),
    (RULER + ["--methods", "ntk:scale=0.5"], "--methods 'ntk:scale=0.5'"),
    (TUNE + ["--param", "scale=4:1"], r"range=\[4.0, 1.0\]: empty"),
    (TUNE + ["--param", "scale=0.5:4", "--method", "yarn"], "crosses 'yarn''s rule at scale=0.5"),
    (TUNE + ["--method", "rope"], "method='rope': nothing to tune"),
    (TUNE + ["--method", "nkt"], "did you mean"),
    (TUNE + ["--param", "scale"], "--param 'scale'"),
    (TUNE + ["--targets", "4096"], "--targets 4096: must be between 1 and --target-length - 1 = 1023"),
    (TUNE + ["--documents", "0"], "--documents 0"),
    (TUNE + ["--data", "/no/such/data"], "data='/no/such/data'"),
    (TUNE + ["--fixed", "beta=x"], "--fixed 'beta=x'"),
])
def test_bad_input_is_exit_2_before_loading(no_loading, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not out.exists()


def test_a_file_as_out_is_refused(no_loading, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for argv in (RULER, TUNE):
        assert cli.main([*argv, "--out", str(tmp_path / "f")]) == 2
        assert "--out: out=" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_ruler_and_tune_are_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "ruler" in text and "tune" in text
