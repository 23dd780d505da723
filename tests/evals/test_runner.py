"""The one runner: methods applied once each in a `with` block, canonical specs run once, a
single spec is one method, a score over no token or a non-finite loss is an error (issue 8)."""

import contextlib

import pytest
import torch

import ropelab
from ropelab.evals import passkey, perplexity
from ropelab.evals.cli import main, parse_methods
from ropelab.evals.data import TokenizedDocument

W = 48


@pytest.fixture(scope="module")
def docs(model):
    g = torch.Generator().manual_seed(3)
    return [TokenizedDocument("doc", torch.randint(0, model.config.vocab_size, (W,), generator=g).tolist())]


class Counting:
    """apply_method that counts entries and exits (the runner must use it as a context manager)."""

    def __init__(self):
        self.events = []

    def __call__(self, model, method):
        @contextlib.contextmanager
        def context():
            self.events.append(("enter", method.spec()))
            try:
                yield model
            finally:
                self.events.append(("exit", method.spec()))

        return context()


def test_a_single_spec_is_one_method_and_duplicates_run_once(model, tokenizer, docs):
    apply = Counting()
    records = perplexity(model, tokenizer, docs, "rope", [16, 32], targets=8, apply_method=apply, progress=False)
    assert {r["method"] for r in records} == {"rope"} and len(records) == 2
    apply = Counting()
    method = ropelab.parse_method("ntk:scale=2")
    records = perplexity(model, tokenizer, docs, ["rope", "rope", method, "ntk:scale=2"], [16, 32], targets=8,
                         apply_method=apply, progress=False)
    assert sorted({r["method"] for r in records}) == ["ntk:scale=2", "rope"] and len(records) == 4
    assert apply.events == [("enter", "rope"), ("exit", "rope"), ("enter", "ntk:scale=2"), ("exit", "ntk:scale=2")]
    assert parse_methods(["rope", "rope,ntk:scale=2", "ntk:scale=2"]) == ["rope", "ntk:scale=2"]


def test_the_method_is_left_even_when_its_jobs_fail(model, tokenizer, docs, monkeypatch):
    from ropelab.evals.protocols import Protocol

    def boom(self, *args):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(Protocol, "score", boom)
    apply = Counting()
    records = perplexity(model, tokenizer, docs, ["rope"], [16], targets=8, apply_method=apply, progress=False)
    assert [r["status"] for r in records] == ["error"] and "kernel failure" in records[0]["error"]
    assert apply.events == [("enter", "rope"), ("exit", "rope")]


def test_a_non_finite_loss_is_an_error_not_ok(model, tokenizer, docs):
    @contextlib.contextmanager
    def poisoned(model_, method):
        weight = model_.lm_head.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0] = float("nan")
        try:
            yield model_
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    records = perplexity(model, tokenizer, docs, ["rope"], [16], targets=8, apply_method=poisoned, progress=False)
    assert records[0]["status"] == "error" and "non-finite" in records[0]["error"]


def test_sliding_scores_every_token_for_each_valid_stride(model, tokenizer, docs):
    for stride in (5, 15):  # every stride below the length: no token left unscored
        (r,) = perplexity(model, tokenizer, docs, ["rope"], [16], protocol="sliding", stride=stride, window=W,
                          apply_method=lambda m, _: contextlib.nullcontext(m), progress=False)
        assert r["status"] == "ok" and r["scored_tokens"] == W - 1 and all(x == x for x in r["losses"])


def test_sliding_at_or_above_the_length_is_refused_on_the_cli(model_dir, text_dir, tmp_path, capsys):
    rc = main(["eval", "--model", str(model_dir), "--data", str(text_dir), "--protocol", "sliding", "--lengths", "64",
               "--stride", "64", "--window", "96", "--short", "concatenate", "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 2 and "stride=64" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_passkey_duplicates_and_single_items(model, tokenizer):
    apply = Counting()
    records = passkey(model, tokenizer, "rope", 256, depths=0.5, apply_method=apply, progress=False)
    assert len(records) == 1 and records[0]["method"] == "rope" and apply.events == [("enter", "rope"), ("exit", "rope")]


def test_a_score_over_no_token_is_an_error(model, tokenizer, docs, monkeypatch):
    from ropelab.evals import protocols

    monkeypatch.setattr(protocols.FixedTarget, "losses", lambda self, settings, model_, ids, n, chunk: ([], [], 1))
    (r,) = perplexity(model, tokenizer, docs, ["rope"], [16], targets=8,
                      apply_method=lambda m, _: contextlib.nullcontext(m), progress=False)
    assert r["status"] == "error" and "scored no token" in r["error"]
