"""`--memory-chunk N` (memory mode from the command line, evals/loading.py): bad values exit 2
before any model loads and leave --out as it was; every forward-running command hands the value
to `load_model`; the loaded model runs its MLPs in slices of N rows; and an eval with the flag
gives the same losses as without it, under a model identity that names the chunk (on
mixture-of-experts models the slices change losses at float32 rounding, so a run keeps its chunk)."""

from __future__ import annotations

import json

import pytest
from run_helpers import snapshot

from ropelab.evals import cli, loading, models
from ropelab.evals.loading import load_model
from ropelab.patches import patch
from ropelab.patches.memory import active_memory_mode

COMMANDS = {  # each forward-running command with its smallest valid arguments (before --model/--out)
    "eval": ["eval", "--lengths", "32", "--targets", "16", "--quiet"],
    "passkey": ["passkey", "--lengths", "256", "--depths", "0.5", "--quiet"],
    "sweep-default": ["sweep-default", "--lengths", "48,96", "--targets", "16", "--quiet"],
    "ruler": ["ruler", "--tasks", "passkey", "--lengths", "1k", "--depths", "0.5", "--quiet"],
    "tune": ["tune", "--method", "ntk", "--target-length", "1k", "--targets", "16"],
}


def run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    return rc, capsys.readouterr()


@pytest.fixture
def spy_load(monkeypatch):
    """Replace the loader (both names it is imported by) with one that records its keywords and stops."""
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stopped by the test after load_model was called")

    monkeypatch.setattr(loading, "load_model", record)
    monkeypatch.setattr(models, "load_model", record)
    return calls


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("value", ["0", "-4", "abc", "1.5", "2q"])
def test_bad_values_exit_2_before_loading_and_leave_out_unchanged(command, value, model_dir, tmp_path, spy_load,
                                                                  capsys):
    out = tmp_path / "run"
    rc, printed = run([*COMMANDS[command], "--model", str(model_dir), "--out", str(out), "--memory-chunk", value], capsys)
    assert rc == 2, printed.err
    assert f"--memory-chunk {value!r}: must be an integer >= 1" in printed.err and "Traceback" not in printed.err
    assert spy_load == [] and snapshot(out) is None


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_forward_command_hands_the_chunk_to_the_loader(command, model_dir, tmp_path, spy_load, capsys):
    base = [*COMMANDS[command], "--model", str(model_dir)]
    run([*base, "--out", str(tmp_path / "a"), "--memory-chunk", "4k"], capsys)
    run([*base, "--out", str(tmp_path / "b")], capsys)
    assert [c.get("memory_chunk") for c in spy_load] == [4096, None]


def test_lm_eval_takes_the_flag_and_export_has_none(model_dir, tmp_path, spy_load, capsys):
    pytest.importorskip("lm_eval")
    rc, printed = run(["lm-eval", "--model", str(model_dir), "--out", str(tmp_path / "lm"), "--memory-chunk", "0"],
                      capsys)
    assert rc == 2 and "--memory-chunk '0'" in printed.err
    rc, printed = run(["export", "--method", "yarn:scale=2", "--out", str(tmp_path / "x"), "--memory-chunk", "8"],
                      capsys)
    assert rc == 2 and "unrecognized arguments: --memory-chunk" in printed.err  # export runs no forward
    assert spy_load == []


def test_load_model_puts_the_model_in_memory_mode(model_dir):
    with pytest.raises(ValueError, match=r"memory_chunk=0: must be an integer >= 1"):
        load_model(str(model_dir), memory_chunk=0)
    model, _, _ = load_model(str(model_dir), memory_chunk=8)
    mode = active_memory_mode(model)
    assert mode is not None and mode.chunk == 8 and any(name.endswith(".mlp") for name in mode.modules)
    wrapped = model.model.layers[0].mlp.forward
    with patch(model, "ntk:scale=2"):  # the runner patches on top of it; the patch's undo leaves it in force
        assert active_memory_mode(model) is mode and model.model.layers[0].mlp.forward is wrapped
    assert active_memory_mode(model) is mode and model.model.layers[0].mlp.forward is wrapped
    assert active_memory_mode(load_model(str(model_dir))[0]) is None


def eval_argv(model_dir, out, *flags):
    return ["eval", "--model", str(model_dir), "--data", "stdlib", "--methods", "rope,ntk:scale=2",
            "--lengths", "32,64", "--targets", "16",
            "--out", str(out), "--quiet", *flags]


def rows_seen(monkeypatch) -> list[int]:
    """Sequence rows entering every decoder layer's MLP down projection during the run's forwards."""
    rows: list[int] = []
    original = loading.load_model

    def hooked(*args, **kwargs):
        model, tokenizer, source = original(*args, **kwargs)
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
        return model, tokenizer, source

    monkeypatch.setattr(loading, "load_model", hooked)
    return rows


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]


def test_same_losses_under_an_identity_that_names_the_chunk(model_dir, tmp_path, monkeypatch, capsys):
    rows = rows_seen(monkeypatch)
    plain, chunked = tmp_path / "plain", tmp_path / "chunked"
    assert run(eval_argv(model_dir, plain), capsys)[0] == 0
    assert max(rows) == 64  # without the flag the MLP sees the whole window (the check below can fail)
    rows.clear()
    assert run(eval_argv(model_dir, chunked, "--memory-chunk", "8"), capsys)[0] == 0
    assert rows and max(rows) == 8  # the flag reached the forward: 64 rows went through in slices of 8
    a, b = records(plain), records(chunked)
    identity = {**json.loads(a[0]["model_key"]), "memory_chunk": 8}
    assert all(json.loads(r["model_key"]) == identity for r in b)  # the chunk, and only it, added
    # Bit-equal on this dense model: slices of 8 rows or more change no row's sums on this CPU
    # (measured: 0 difference on every dense tiny family, and at 16k × 30 layers of SmolLM2;
    # README "Memory mode"). Not so on mixture-of-experts models, hence the identity.
    assert [r["losses"] for r in a] == [r["losses"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # The chunked run resumes with its chunk (nothing rerun); without it, or with another
    # chunk, it is another model's store: exit 2, the files as they were.
    lines = (chunked / "results.jsonl").read_text()
    assert run(eval_argv(model_dir, chunked, "--memory-chunk", "8"), capsys)[0] == 0
    assert (chunked / "results.jsonl").read_text() == lines
    before = snapshot(chunked)
    for flags in ([], ["--memory-chunk", "16"], ["--memory-chunk", "0"]):
        rc, printed = run(eval_argv(model_dir, chunked, *flags), capsys)
        assert rc == 2 and snapshot(chunked) == before, printed.err
        assert ("--memory-chunk '0'" if "0" in flags else "different model or protocol") in printed.err
