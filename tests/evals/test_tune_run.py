"""`ropelab tune` on a tiny model: evaluations stored as they finish, a rerun resumes, bad input refused first."""

import argparse
import json

import pytest

from ropelab.evals.results import SCHEMA
from ropelab.evals.tune import Continuous, Grid
from ropelab.evals.tune_run import add_parser, default_space, parse_param


def parser():
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    return p


def test_tune_end_to_end_then_resume(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "tune"
    argv = ["tune", "--model", str(model_dir), "--method", "ntk", "--target-length", "48", "--targets", "16",
            "--param", "scale=1:4", "--documents", "1", "--skip-documents", "1", "--data", str(text_dir), "--out", str(out)]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    lines = (out / "tune.jsonl").read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["kind"] == "tune" and header["schema"] == SCHEMA and "model_key" in header
    assert all(r["params"]["skip_documents"] == 1 and r["params"]["target_length"] == 48 for r in records)
    assert len({r["key"] for r in records}) == len(records)  # every evaluation once
    assert len(records) == 8 and all(r["interval"]["low"] <= r["interval"]["mean"] <= r["interval"]["high"] for r in records)
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best["loss"]["mean"] == min(r["interval"]["mean"] for r in records)
    assert set(best["suggested"]) == {"scale"} and best["suggested"]["scale"] >= 1  # the rule's s = max(1, N/L)
    assert (out / "tune_scale.png").is_file()
    assert args.func(args) == 0  # resumed: every evaluation from the file
    assert len((out / "tune.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.parametrize("argv, message", [
    (["--method", "rope"], "method='rope': nothing to tune"),
    (["--method", "yarn", "--param", "scale=0.5:4"], "scale range .*crosses 'yarn''s rule at scale=0.5"),
    (["--method", "ntk", "--param", "scale=4:1"], r"range=\[4.0, 1.0\]: empty"),
    (["--method", "nkt"], "did you mean"),
])
def test_tune_bad_input_before_loading(tmp_path, argv, message):
    args = parser().parse_args(["tune", "--model", "no-such-model", "--target-length", "64", "--out", str(tmp_path / "x"), *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)
    assert not (tmp_path / "x").exists()


def test_parse_param_and_default_space():
    assert parse_param("scale=1:8:log") == ("scale", Continuous(1.0, 8.0, log=True))
    assert parse_param("window=1024|2048") == ("window", Grid((1024, 2048)))
    with pytest.raises(ValueError, match="--param 'scale'"):
        parse_param("scale")
    with pytest.raises(ValueError, match="--param 'scale=1:2:lin'"):
        parse_param("scale=1:2:lin")
    space = default_space("leaky-rerope", 8192, 16384)
    assert space["window"] == Grid((1024, 2048, 4096)) and space["scale"].log
    assert default_space("yarn", 8192, 16384)["scale"] == Continuous(1.0, 8.0, log=True)


def test_suggested_setting_is_the_rule_based_default_the_figure_marks():
    from ropelab.evals.tune_run import suggested_setting

    # L = 8192, N = 16k (the main job): s = N/L = 2; rerope w = L/2; leaky-rerope w = L/4 and Su's k = 16
    assert suggested_setting("ntk", 8192, 16384, 64, 1e5)["scale"] == 2
    assert suggested_setting("beta-base", 8192, 16384, 64, 1e5)["scale"] == 2
    assert suggested_setting("rerope", 8192, 16384, 64, 1e5)["window"] == 4096
    leaky = suggested_setting("leaky-rerope", 8192, 16384, 64, 1e5)
    assert (leaky["window"], leaky["scale"]) == (2048, 16)
    assert suggested_setting("ntk", 8192, 65536, 64, 1e5)["scale"] == 8
