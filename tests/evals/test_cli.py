"""The `ropelab` command end to end at small sizes, on a tiny model saved with save_pretrained."""

import json
import subprocess
import sys

import pytest

from ropelab.evals.cli import main, split_methods


def test_split_methods():
    assert split_methods("rope,ntk:scale=2,logn=true,rerope:window=4k") == [
        "rope", "ntk:scale=2,logn=true", "rerope:window=4k"]
    assert split_methods("leaky-rerope:window=8,frequency_method=ntk(scale=2,logn=false),rope") == [
        "leaky-rerope:window=8,frequency_method=ntk(scale=2,logn=false)", "rope"]


def test_eval_end_to_end_then_resume_then_plot(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", str(model_dir), "--data", str(text_dir), "--methods", "rope",
            "--lengths", "32,64", "--targets", "16", "--documents", "2", "--short", "concatenate",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    protocol = json.loads(lines[0])
    assert protocol["name"] == "fixed-target" and protocol["short"] == "concatenate" and protocol["targets"] == 16
    assert len(lines) == 1 + 2 * 2
    for name in ("loss_vs_context.png", "loss_vs_context.svg", "per_position.png", "report.md"):
        assert (out / name).is_file()
    assert main(argv) == 0  # resumed: nothing new
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
    assert main(["plot", str(out)]) == 0
    assert "| `rope` |" in (out / "report.md").read_text()


def test_exit_codes_and_one_line_errors(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(model_dir), "--methods", "ntk:scale=0.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "scale=0.5" in err and "Traceback" not in err
    assert main(["eval", "--model", str(model_dir), "--lengths", "4q", "--out", str(tmp_path)]) == 2
    assert main(["eval", "--model", "/no/such/model", "--out", str(tmp_path)]) == 2
    assert "model='/no/such/model'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_failed_jobs_give_exit_code_1(model_dir, text_dir, tmp_path, capsys):
    # `sinusoidal` cannot be patched into a RoPE model: recorded as failed, the sweep goes on,
    # the report is still written, and the command exits 1.
    out = tmp_path / "run"
    rc = main(["eval", "--model", str(model_dir), "--data", str(text_dir), "--methods", "rope,sinusoidal",
               "--lengths", "32", "--targets", "8", "--out", str(out), "--quiet"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert rc == 1
    assert [r["status"] for r in records] == ["ok", "error"] and records[1]["method"] == "sinusoidal"
    assert (out / "report.md").is_file()


def test_sweep_default_wiring_prints_the_table(model_dir, tmp_path, capsys):
    """The main job's command at toy lengths: seven methods, bf16 by default, plot and table."""
    out = tmp_path / "main"
    rc = main(["sweep-default", "--model", str(model_dir), "--lengths", "48,96", "--targets", "16",
               "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rc == 0, records
    assert records[0]["model"].endswith("@bfloat16")
    assert len({r["method"] for r in records[1:]}) == 7 and all(r["status"] == "ok" for r in records[1:])
    assert "| `rope` |" in printed and "| `leaky-rerope:" in printed
    assert (out / "loss_vs_context.png").is_file()


def test_python_m_and_help():
    result = subprocess.run([sys.executable, "-m", "ropelab.evals", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sweep-default" in result.stdout and "Exit codes" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ropelab.evals", "methods"], capture_output=True, text=True)
    assert result.returncode == 0 and "leaky-rerope" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ropelab", "suggest", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--target-length" in result.stdout  # the package's own entry point
    result = subprocess.run([sys.executable, "-m", "ropelab", "eval", "--lengths", "4q", "--out", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--lengths '4q'" in result.stderr  # its exit code passes through


def test_stray_lines_are_skipped_and_reported_by_eval_and_plot(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", str(model_dir), "--data", str(text_dir), "--lengths", "32", "--targets", "8",
            "--short", "concatenate", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    with open(out / "results.jsonl", "a") as f:  # lines 3 and 4: valid JSON, not records
        f.write('[1,2,3]\n{"hello":1}\n')
    capsys.readouterr()
    assert main(argv) == 0  # resumed: nothing to do, and the stray lines do not stop it
    err = capsys.readouterr().err
    assert "results.jsonl line 3: a JSON list" in err and "results.jsonl line 4:" in err
    assert main(["plot", str(out)]) == 0
    assert "results.jsonl line 4:" in capsys.readouterr().err
    assert "line 3" in (out / "report.md").read_text()


def test_a_relative_and_an_absolute_data_path_are_one_protocol(model_dir, text_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(text_dir.parent)
    out = tmp_path / "run"
    argv = ["eval", "--model", str(model_dir), "--lengths", "32", "--targets", "8", "--short", "concatenate",
            "--out", str(out), "--quiet"]
    assert main([*argv, "--data", text_dir.name]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["data"] == str(text_dir.resolve())
    assert main([*argv, "--data", str(text_dir)]) == 0  # the same folder: resumed, nothing redone
    assert (out / "results.jsonl").read_text().splitlines() == lines
