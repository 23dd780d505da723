"""The CLI wiring of the scale-out parts: `suggest` and `export` are subcommands, the loading
flags reach eval / passkey / sweep-default / lm-eval (bad ones exit 2 before any model loads,
leaving --out as it was), and a hub id from the local cache is recorded by id and commit."""

from __future__ import annotations

import json

import pytest
from evals_helpers import COMMIT
from run_helpers import snapshot

from ropelab.evals.cli import main


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    return rc, capsys.readouterr()


@pytest.fixture
def no_load(monkeypatch):
    import ropelab.evals.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that needs no model")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_suggest_is_a_subcommand(capsys):
    rc, printed = run(["suggest", "--target-length", "16k", "--train-length", "8k", "--head-dim", "64",
                       "--base", "10000"], capsys)
    assert rc == 0 and "ntk:scale=2" in printed.out
    rc, printed = run(["suggest", "--target-length", "0", "--train-length", "8k", "--head-dim", "64",
                       "--base", "10000"], capsys)
    assert rc == 2 and "--target-length" in printed.err


def test_export_is_a_subcommand(model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    rc, printed = run(["export", "--model", str(model_dir), "--method", "yarn:scale=2", "--out", str(out)], capsys)
    assert rc == 0, printed.err
    config = json.loads((out / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2


def test_export_refuses_before_loading(no_load, tmp_path, capsys):
    rc, printed = run(["export", "--method", "rerope:window=8", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "--method 'rerope:window=8'" in printed.err and not (tmp_path / "x").exists()
    rc, printed = run(["export", "--method", "yarn:scale=2", "--out", str(tmp_path / "y"), "--dtype", "int4"], capsys)
    assert rc == 2 and "--dtype 'int4'" in printed.err


BASES = {
    "eval": ["--lengths", "32", "--targets", "16"],
    "passkey": ["--lengths", "256", "--depths", "0.5"],
    "sweep-default": ["--lengths", "48,96", "--targets", "16"],
}
BAD_LOADING = [
    (["--dtype", "float64"], "--dtype 'float64': must be one of float32, bfloat16, float16"),
    (["--device", "tpu"], "--device 'tpu': must be cpu, cuda, cuda:N or mps"),
    (["--device-map", "auto", "--device", "cpu"], "--device-map 'auto' with device='cpu': give one"),
    (["--device-map", "auto", "--max-memory", "0=lots"], "--max-memory '0=lots': size 'lots' for 0 is not a size"),
    (["--max-memory", "cpu=1GiB"], "--max-memory 'cpu=1GiB': only applies with a device_map"),
    (["--attn-implementation", "flash"], "--attn-implementation 'flash': must be one of"),
    (["--revision", "v1"], "revision='v1': "),  # a local folder has no revisions
]


@pytest.mark.parametrize("command", sorted(BASES))
@pytest.mark.parametrize("flags, message", BAD_LOADING)
def test_bad_loading_flags_exit_2_before_loading(command, flags, message, model_dir, tmp_path, no_load, capsys):
    out = tmp_path / "run"
    rc, printed = run([command, "--model", str(model_dir), *BASES[command], "--out", str(out), "--quiet", *flags],
                      capsys)
    assert rc == 2 and message in printed.err and "Traceback" not in printed.err
    assert snapshot(out) is None


def test_lm_eval_takes_the_loading_flags(model_dir, tmp_path, no_load, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm"
    rc, printed = run(["lm-eval", "--model", str(model_dir), "--out", str(out), "--device", "tpu"], capsys)
    assert rc == 2 and "--device 'tpu'" in printed.err and snapshot(out) is None


def test_a_name_that_is_nothing_exits_2_before_loading(tmp_path, no_load, capsys):
    rc, printed = run(["eval", "--model", "no/such/folder/x", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "model='no/such/folder/x': not an embedded default" in printed.err
    rc, printed = run(["passkey", "--model", "default", "--device-map", "auto", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "the embedded default 'smollm2-135m' loads whole" in printed.err
    assert snapshot(tmp_path / "r") is None


def eval_argv(model, out, *flags):
    return ["eval", "--model", model, "--data", "stdlib", "--lengths", "32", "--targets", "16", "--out", str(out),
            "--quiet", *flags]


def test_hub_id_runs_from_the_cache_and_is_recorded_by_id_and_commit(hub, tmp_path, capsys):
    out = tmp_path / "run"
    rc, printed = run(eval_argv("org/tiny", out), capsys)
    assert rc == 0, printed.err
    lines = (out / "results.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["model_identity"] == {"kind": "hub", "id": "org/tiny", "commit": COMMIT, "dtype": "float32",
                                        "attention": header["model_identity"]["attention"]}
    # the same snapshot named by its commit is the same model: resumed, nothing run again
    rc, printed = run(eval_argv("org/tiny", out, "--revision", COMMIT), capsys)
    assert rc == 0 and (out / "results.jsonl").read_text().splitlines() == lines
    # tag v1 is another commit (other weights, as far as the identity can know): refused, nothing written
    before = snapshot(out)
    rc, printed = run(eval_argv("org/tiny", out, "--revision", "v1"), capsys)
    assert rc == 2 and "different model" in printed.err and snapshot(out) == before
    rc, printed = run(eval_argv("org/tiny", out, "--dtype", "bfloat16"), capsys)  # the dtype is in the identity
    assert rc == 2 and "different model" in printed.err and snapshot(out) == before


def test_offline_hub_id_not_cached_exits_2_naming_it(hub, tmp_path, capsys):
    rc, printed = run(eval_argv("org/missing", tmp_path / "run"), capsys)
    assert rc == 2 and "model='org/missing'" in printed.err and "hf download org/missing" in printed.err
    assert snapshot(tmp_path / "run") is None


def test_a_broken_torchrun_environment_exits_2(model_dir, tmp_path, no_load, monkeypatch, capsys):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for name, value in {**env, "RANK": "x"}.items():
        monkeypatch.setenv(name, value)
    for command in ("eval", "lm-eval"):  # lm-eval runs on ranks too (test_lmeval_parallel.py)
        rc, printed = run([command, "--model", str(model_dir), "--out", str(tmp_path / "r")], capsys)
        assert rc == 2 and "torchrun's environment: RANK='x'" in printed.err and snapshot(tmp_path / "r") is None
    monkeypatch.setenv("RANK", "1")  # lm-eval with fewer documents than ranks: refused before joining the ranks
    rc, printed = run(["lm-eval", "--model", str(model_dir), "--limit", "1", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "--limit 1: fewer documents than the 2 ranks" in printed.err and snapshot(tmp_path / "r") is None
