"""Bad input and faults, through the CLI and the Python API (issue 8).

Every case asserts the exit code (2) or the exception (ValueError), that the message names
the field, and that the run directory is exactly as it was: absent when it was absent, byte
for byte the same when it held an earlier run. Input that needs no model is refused before
the model loads (loading is replaced by a function that fails the test).
"""

import contextlib
import json
import os

import pytest

from ropelab.evals import passkey, perplexity
from ropelab.evals.cli import main
from ropelab.evals.data import TokenizedDocument
from ropelab.evals.lmeval import lm_eval_run
from ropelab.evals.protocols import Protocol
from ropelab.evals.results import ResultStore, RunLocked
from run_helpers import snapshot


def unpatched(model, method):
    return contextlib.nullcontext(model)


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, model_dir):
    """A run directory holding one earlier, successful run (perplexity and passkey)."""
    root = tmp_path_factory.mktemp("existing")
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The grass is green. The sky is blue. " * 40)
    run = root / "run"
    assert main(["eval", "--model", str(model_dir), "--data", str(docs), "--lengths", "32,64", "--targets", "16",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["passkey", "--model", str(model_dir), "--lengths", "256", "--depths", "0.5",
                 "--out", str(run), "--quiet"]) == 0
    return run, docs


@pytest.fixture(params=["missing", "existing"])
def out(request, tmp_path, existing_run):
    return tmp_path / "new-run" if request.param == "missing" else existing_run[0]


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: these inputs must be refused before it."""
    import ropelab.evals.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that needs no model")

    monkeypatch.setattr(loading, "load_model", refuse)


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusals (unknown choice) exit 2 through SystemExit
        rc = exc.code
    return rc, capsys.readouterr().err


# (argv after the subcommand's valid base arguments, text the message must contain)
NO_MODEL_EVAL = [
    (["--data", "/nonexistent"], "data='/nonexistent'"),
    (["--lengths", "4q"], "--lengths '4q'"),
    (["--lengths", "2k,abc"], "--lengths '2k,abc'"),
    (["--lengths", ""], "--lengths ''"),
    (["--lengths", "1"], "--lengths '1'"),
    (["--documents", "0"], "--documents"),
    (["--documents", "-1"], "--documents"),
    (["--chunk", "0"], "--chunk"),
    (["--targets", "0"], "targets=0"),
    (["--targets", "64"], "targets=64"),
    (["--protocol", "sliding", "--stride", "32"], "stride=32"),
    (["--protocol", "sliding", "--stride", "0"], "stride=0"),
    (["--window", "16"], "W=16"),
    (["--methods", "ntk:scale=0.5"], "scale=0.5"),
    (["--methods", "nosuchmethod"], "nosuchmethod"),
    (["--methods", "ntk:scale"], "ntk:scale"),
    (["--methods", ","], "--methods"),
    (["--model", "/no/such/model"], "model='/no/such/model'"),
    (["--short", "pad"], "--short"),
    (["--protocol", "nosuch"], "--protocol"),
]


@pytest.mark.parametrize("extra,named", NO_MODEL_EVAL, ids=[" ".join(a) for a, _ in NO_MODEL_EVAL])
def test_eval_refuses_before_loading(extra, named, out, existing_run, no_load, capsys):
    before = snapshot(out)
    argv = ["eval", "--data", str(existing_run[1]), "--lengths", "32,64", "--targets", "16", "--quiet",
            "--out", str(out), *extra]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and named in err and "Traceback" not in err
    assert snapshot(out) == before


NO_MODEL_OTHER = [
    (["passkey", "--trials", "0"], "--trials"),
    (["passkey", "--trials", "-2"], "--trials"),
    (["passkey", "--depths", ""], "--depths"),
    (["passkey", "--depths", "1.5"], "--depths"),
    (["passkey", "--depths", "abc"], "--depths"),
    (["passkey", "--lengths", "4q"], "--lengths"),
    (["passkey", "--methods", "yarn:scale=-1"], "scale=-1"),
    (["sweep-default", "--lengths", "16k,x"], "--lengths"),
    (["sweep-default", "--lengths", "2k", "--targets", "4096"], "targets=4096"),
    (["lm-eval", "--tasks", ","], "--tasks"),
    (["lm-eval", "--limit", "0"], "--limit"),
    (["lm-eval", "--method", "ntk:scale=0.5"], "scale=0.5"),
    (["lm-eval", "--passkey-lengths", "x"], "--passkey-lengths"),
]


@pytest.mark.parametrize("argv,named", NO_MODEL_OTHER, ids=[" ".join(a) for a, _ in NO_MODEL_OTHER])
def test_other_commands_refuse_before_loading(argv, named, out, no_load, capsys):
    before = snapshot(out)
    rc, err = run_cli([*argv, "--quiet", "--out", str(out)], capsys)
    assert rc == 2 and named in err and "Traceback" not in err
    assert snapshot(out) == before


def test_unusable_out_names_out(tmp_path, model_dir, existing_run, no_load, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for out in (a_file, a_file / "below"):
        before = snapshot(a_file)
        rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(existing_run[1]), "--lengths", "32",
                           "--targets", "16", "--out", str(out)], capsys)
        assert rc == 2 and "--out" in err and str(out) in err
        assert snapshot(a_file) == before


def test_plot_of_a_missing_run(tmp_path, capsys):
    rc, err = run_cli(["plot", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "run=" in err and not (tmp_path / "missing").exists()


# Found only once the tokenizer has read the data: refused after loading, still before writing.
def _empty(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


def _binary(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return tmp_path / "blob.bin"


def _empty_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    return tmp_path / "nothing"


@pytest.mark.parametrize("make", [_empty, _binary, _empty_folder], ids=["empty file", "binary file", "empty folder"])
def test_unusable_data_after_loading(make, tmp_path, out, model_dir, capsys):
    data = make(tmp_path)
    before = snapshot(out)
    rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(data), "--lengths", "32,64", "--targets", "16",
                       "--quiet", "--out", str(out)], capsys)
    assert rc == 2 and "data=" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_too_many_documents_and_too_short_passkey(out, model_dir, existing_run, capsys):
    before = snapshot(out)
    rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(existing_run[1]), "--lengths", "32,64",
                       "--targets", "16", "--documents", "5", "--quiet", "--out", str(out)], capsys)
    assert rc == 2 and "only 1 of 5 documents" in err and "data=" in err
    rc, err = run_cli(["passkey", "--model", str(model_dir), "--lengths", "10", "--quiet", "--out", str(out)], capsys)
    assert rc == 2 and "length=10" in err
    rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(existing_run[1]), "--lengths", "1024m",
                       "--targets", "16", "--quiet", "--out", str(out)], capsys)  # 2^30 tokens: no document has them
    assert rc == 2 and "1073741824 tokens" in err and "data=" in err
    assert snapshot(out) == before


def test_a_different_protocol_in_an_existing_run(existing_run, model_dir, capsys):
    run, docs = existing_run
    before = snapshot(run)
    rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(docs), "--lengths", "32,64", "--targets", "8",
                       "--quiet", "--out", str(run)], capsys)
    assert rc == 2 and "different protocol" in err and "targets" in err
    assert snapshot(run) == before


def test_a_held_lock_is_refused_naming_out(existing_run, model_dir, no_load, capsys):
    run, docs = existing_run
    with ResultStore(run, "perplexity"):  # another writer holds results.jsonl: refused before loading
        before = snapshot(run)
        rc, err = run_cli(["eval", "--model", str(model_dir), "--data", str(docs), "--lengths", "32,64",
                           "--targets", "16", "--quiet", "--out", str(run)], capsys)
        assert rc == 2 and f"out={str(run)!r}" in err and "another ropelab process" in err
        assert snapshot(run) == before


# The Python API: ValueError naming the field, nothing written.
@pytest.fixture(scope="module")
def docs48(model):
    return [TokenizedDocument("d", list(range(1, 49)))]


API_PERPLEXITY = [
    (dict(lengths=[]), "lengths=[]"),
    (dict(lengths=[1]), "lengths=1"),
    (dict(lengths="32"), "lengths='32'"),
    (dict(methods=[]), "methods=[]"),
    (dict(chunk=0), "chunk=0"),
    (dict(protocol="nope"), "protocol='nope'"),
    (dict(protocol="sliding", stride=16, lengths=[16, 32]), "stride=16"),
    (dict(targets=32), "targets=32"),
    (dict(window=16), "W=16"),
    (dict(documents="/nonexistent"), "data='/nonexistent'"),
    (dict(documents="stdlib", num_documents=0), "num_documents=0"),
    (dict(lengths=[64]), "document='d'"),
    (dict(model_source={"kind": "cloud"}), "model_source="),
    (dict(short="pad"), "short='pad'"),
]


@pytest.mark.parametrize("kwargs,named", API_PERPLEXITY, ids=[n for _, n in API_PERPLEXITY])
def test_perplexity_api_refuses(kwargs, named, model, tokenizer, docs48, out):
    before = snapshot(out)
    call = dict(documents=docs48, methods=["rope"], lengths=[16, 32], targets=8, out=out, apply_method=unpatched,
                progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError) as info:
        perplexity(model, tokenizer, call.pop("documents"), call.pop("methods"), call.pop("lengths"), **call)
    assert named in str(info.value)
    assert snapshot(out) == before


API_PASSKEY = [
    (dict(trials=0), "trials=0"),
    (dict(trials=-2), "trials=-2"),
    (dict(depths=[]), "depths=[]"),
    (dict(depths=[1.5]), "1.5"),
    (dict(depths="0.5"), "depths='0.5'"),
    (dict(lengths=[10]), "length=10"),
    (dict(seed="x"), "seed='x'"),
]


@pytest.mark.parametrize("kwargs,named", API_PASSKEY, ids=[n for _, n in API_PASSKEY])
def test_passkey_api_refuses(kwargs, named, model, tokenizer, out):
    before = snapshot(out)
    call = dict(lengths=[256], depths=(0.5,), out=out, apply_method=unpatched, progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError) as info:
        passkey(model, tokenizer, ["rope"], call.pop("lengths"), **call)
    assert named in str(info.value)
    assert snapshot(out) == before


def test_store_and_protocol_refusals(tmp_path):
    with pytest.raises(ValueError, match="window=0"):
        Protocol("position", window=0)
    with pytest.raises(ValueError, match="kind='nope'"):
        ResultStore(tmp_path / "x", "nope")
    with pytest.raises(ValueError, match="shard='a/b'"):
        ResultStore(tmp_path / "x", "perplexity", shard="a/b")
    with pytest.raises(ValueError, match="tasks=\\[\\]"):
        lm_eval_run(None, None, [], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_older_schema_is_refused_not_rerun(tmp_path, model, tokenizer, docs48, model_dir, no_load, capsys):
    run = tmp_path / "old"
    run.mkdir()
    header = {"type": "protocol", "kind": "perplexity", "model": "model", "name": "fixed-target"}  # no schema: 1
    record = {"type": "perplexity", "key": "k", "method": "rope", "protocol": "fixed-target", "window": 32,
              "targets": 8, "document": "d", "length": 32, "status": "ok", "loss": 1.0, "scored_tokens": 8}
    (run / "results.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    before = snapshot(run)
    with pytest.raises(ValueError, match="schema 1"):
        perplexity(model, tokenizer, docs48, ["rope"], [16, 32], targets=8, out=run, apply_method=unpatched,
                   progress=False)
    assert snapshot(run) == before
    rc, err = run_cli(["eval", "--model", str(model_dir), "--lengths", "16,32", "--targets", "8", "--out", str(run)],
                      capsys)  # the CLI refuses it before loading the model
    assert rc == 2 and "--out" in err and "schema 1" in err and snapshot(run) == before
    from ropelab.evals.summary import load, table

    header_read, records = load(run)  # still readable
    assert table(header_read, records) == {"rope": {32: 1.0}}


def test_the_lock_error_is_a_value_error_naming_out(tmp_path):
    with ResultStore(tmp_path, "passkey"):
        with pytest.raises(RunLocked, match="out="):
            ResultStore(tmp_path, "passkey")
    assert os.listdir(tmp_path)  # the lock files stay (they are never removed while in use)
