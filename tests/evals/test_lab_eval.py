"""`lab eval` on micro runs: the table has a row per (training position, applicable method)
and a column per length, each cell recomputed here from the model's own logits; methods that
need rotary positions are refused on models without them, before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lab_helpers import corpus, micro_config  # noqa: F401  (corpus: a fixture)

import ropelab
from ropelab.evals.lab import default_methods, evaluate, train
from ropelab.evals.lab.evaluate import paired, plan, table_from_store
from ropelab.evals.lab.corpus import heldout_documents
from ropelab.evals.lab.methods import clamped_positions


@pytest.fixture(scope="module")
def runs(corpus, tokenizer, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lab-runs")
    out = {}
    for position in ("rope", "nope", "learned", "sinusoidal"):
        train(micro_config(position, corpus, tokens=4 * 16 * 6), root / position, tokenizer=tokenizer, progress=False)
        out[position] = root / position
    return out


def reference(model, ids, n):
    """Mean loss and accuracy of the first n tokens, from the model's full logits."""
    ids = torch.tensor(ids[:n])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[1:]).item(), (logits.argmax(-1) == ids[1:]).double().mean().item()


def test_table_cells_match_the_models_own_logits(runs, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    table = evaluate([runs["rope"], runs["nope"], runs["learned"], runs["sinusoidal"]], tmp_path / "eval",
                     factors=(1, 2), documents=1, progress=False)
    assert table["lengths"] == [16, 32]
    rows = {(r["position"], r["method"]): r for r in table["rows"]}
    expected = [("rope", m) for m in default_methods("rope", 16, 32)] + [("nope", "rope"), ("learned", "rope")] + [
        ("sinusoidal", m) for m in default_methods("sinusoidal", 16, 32)]
    assert sorted(rows) == sorted(expected)
    for position, method, context in [("rope", "ntk:scale=2", "patch"), ("rope", "rerope:window=8,logn=true", "patch"),
                                      ("nope", "rope", None), ("learned", "rope", "clamp"),
                                      ("sinusoidal", "linear:scale=2", "patch")]:
        run = json.loads((runs[position] / "lab.json").read_text())["run"]
        doc = heldout_documents(run["data"], tokenizer, 32, 1, run["heldout_every"])[0]
        model = AutoModelForCausalLM.from_pretrained(runs[position] / "model").eval()
        for n in (16, 32):
            if context == "patch":
                with ropelab.patched(model, method):
                    loss, acc = reference(model, doc.ids, n)
            elif context == "clamp":
                with clamped_positions(model, 16):
                    loss, acc = reference(model, doc.ids, n)
            else:
                loss, acc = reference(model, doc.ids, n)
            cell = rows[(position, ropelab.parse_method(method).spec())]["cells"][n]  # rows use canonical specs
            # the same float32 forward; only the order of the float32 sums differs (head in one
            # matmul here, per-token losses summed in float64 there): a few ulps of ~5 nats
            assert cell["loss"] == pytest.approx(loss, rel=1e-6), (position, method, n)
            assert cell["accuracy"] == pytest.approx(acc, abs=1e-12), (position, method, n)
    text = (tmp_path / "eval" / "lab_table.md").read_text()
    assert "| training position · inference method | seeds | 16 | 32 |" in text
    assert "| nope · as trained | 1 |" in text and "| learned · as trained (clamped past L) | 1 |" in text
    for position in ("rope", "nope", "learned", "sinusoidal"):
        assert (tmp_path / "eval" / f"loss_vs_length_{position}.png").exists()
    # a rerun finds every job done and writes no new record
    lines = (tmp_path / "eval" / "lab_results.jsonl").read_text().count("\n")
    evaluate([runs["rope"]], tmp_path / "eval", factors=(1, 2), documents=1, progress=False)
    assert (tmp_path / "eval" / "lab_results.jsonl").read_text().count("\n") == lines


@pytest.mark.parametrize(
    "position, method, message",
    [
        ("nope", "rerope:window=8", "a 'nope' model has no rotary positions to change"),
        ("learned", "ntk:scale=2", "a 'learned' model has no rotary positions to change"),
        ("sinusoidal", "rerope:window=8", "needs rotary positions inside attention"),
        ("sinusoidal", "rope:logn=true", "needs rotary positions inside attention"),
        ("sinusoidal", "sinks", "needs rotary positions inside attention"),  # key-range parts, no relative map
        ("sinusoidal", "dca", "needs rotary positions inside attention"),
    ],
)
def test_methods_needing_rotary_positions_are_refused(runs, position, method, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate([runs[position]], tmp_path / "eval", factors=(1, 2), methods=[method], documents=1, progress=False)
    assert not (tmp_path / "eval").exists()


def test_an_unfinished_run_is_refused(corpus, tokenizer, tmp_path):  # noqa: F811
    train(micro_config("rope", corpus, tokens=4 * 16 * 4), tmp_path / "run", tokenizer=tokenizer, progress=False,
          stop_after=1)
    with pytest.raises(ValueError, match="training has not finished"):
        evaluate([tmp_path / "run"], tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()


def test_trained_models_run_in_the_ordinary_harness(runs, tokenizer):
    """What `ropelab eval --model RUN/model` does: load the folder, patch, score (rope and sinusoidal models)."""
    from ropelab.evals import perplexity
    from ropelab.evals.models import load_model, train_length

    for position, methods in (("rope", ["rope", "ntk:scale=2", "rerope:window=8"]), ("sinusoidal", ["rope", "ntk:scale=2"])):
        model, tok, _ = load_model(str(runs[position] / "model"))
        assert train_length(model) == 16 and len(tok) == len(tokenizer)
        run = json.loads((runs[position] / "lab.json").read_text())["run"]
        docs = heldout_documents(run["data"], tok, 64, 1, run["heldout_every"])
        records = perplexity(model, tok, docs, methods, [32, 64], targets=16, progress=False)
        assert {r["method"] for r in records} == set(methods)
        assert all(r["status"] == "ok" and r["loss"] > 0 for r in records)


def test_jobs_are_runner_jobs_resumed_per_length(runs, tmp_path):
    """Each (model, method, length) is one job in the store; a later call with a new length runs
    only that length's jobs, and the tables are drawn from the store alone."""
    from ropelab.evals.results import ResultStore

    methods = ["rope", "ntk:scale=2"]
    evaluate([runs["rope"]], tmp_path / "eval", factors=(1,), methods=methods, documents=1, progress=False)
    with ResultStore(tmp_path / "eval", "lab") as store:
        first = store.merged()
    assert {(r["method"], r["length"], r["status"]) for r in first} == {(m, 16, "ok") for m in methods}
    assert len(first) == 2
    assert all(r["model_key"].startswith("rope@") and r["type"] == "lab" and r["predictions"] == 15 for r in first)
    table = evaluate([runs["rope"]], tmp_path / "eval", factors=(1, 2), methods=methods, documents=1, progress=False)
    with ResultStore(tmp_path / "eval", "lab") as store:
        second = store.merged()
    new = [r for r in second if r["key"] not in {f["key"] for f in first}]  # the 16-token jobs were done
    assert sorted((r["method"], r["length"]) for r in new) == [("ntk:scale=2", 32), ("rope", 32)]
    assert [n for n in table["lengths"]] == [16, 32] and len(table["rows"]) == 2
    text = (tmp_path / "eval" / "lab_table.md").read_text()
    (tmp_path / "eval" / "lab_table.md").unlink()
    assert table_from_store(tmp_path / "eval", plan([runs["rope"]], [1, 2], methods)) == table
    assert (tmp_path / "eval" / "lab_table.md").read_text() == text


def test_paired_differences_match_by_seed():
    def rec(run, position, seed, n, loss):
        return {"type": "lab", "status": "ok", "run": run, "position": position, "method": "rope", "seed": seed,
                "length": n, "loss": loss, "accuracy": 0.0, "train_length": 16}

    records = [rec("a0", "rope", 0, 16, 5.0), rec("a1", "rope", 1, 16, 5.5), rec("a2", "rope", 2, 16, 6.0),
               rec("b0", "nope", 0, 16, 5.25), rec("b1", "nope", 1, 16, 5.0)]  # nope has no seed 2
    lengths = {r["run"]: [16] for r in records}
    got = paired(records, lengths, ("rope", "rope"), ("nope", "rope"))
    assert got[16]["seeds"] == [0, 1] and got[16]["differences"] == [-0.25, 0.5]
    assert got[16]["mean"] == 0.125 and got[16]["sd"] == pytest.approx(0.75 / 2**0.5, rel=1e-15)


def test_cuda_asked_where_absent_is_exit_2(runs, tmp_path, capsys, monkeypatch):
    from ropelab.evals.lab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(runs["rope"]), "--out", str(tmp_path / "eval"), "--device", "cuda"]) == 2
    assert "device='cuda': no CUDA device is available here" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
