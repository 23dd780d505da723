"""The sweep: each protocol's numbers against a direct computation, resume after a crash,
failures recorded while the sweep goes on."""

import contextlib
import json

import pytest
import torch

import ropelab

from ropelab.evals import TokenizedDocument, perplexity, token_losses
from ropelab.evals.results import read_file

W = 48  # window: tokens per document


@pytest.fixture(scope="module")
def docs(model):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    return [TokenizedDocument(f"doc{i}", torch.randint(0, vocab, (W,), generator=g).tolist()) for i in range(2)]


def unpatched(model, method):
    return contextlib.nullcontext(model)


def run(model, tokenizer, docs, methods, lengths, **kw):
    kw.setdefault("apply_method", unpatched)
    return perplexity(model, tokenizer, docs, methods, lengths, progress=False, **kw)


def test_fixed_target_scores_the_same_last_k_tokens(model, tokenizer, docs):
    records = run(model, tokenizer, docs, ["rope"], [16, 32, W], protocol="fixed-target", targets=8)
    assert len(records) == 2 * 3 and all(r["status"] == "ok" for r in records)
    for r in records:
        ids = next(d.ids for d in docs if d.id == r["document"])
        direct = token_losses(model, ids[W - r["length"] :])
        assert r["scored_tokens"] == 8 and len(r["losses"]) == r["length"] - 1
        assert r["loss"] == pytest.approx(direct[-8:].mean().item(), abs=1e-5)


def test_position_protocol_one_forward_for_prefix_consistent(model, tokenizer, docs):
    calls = []

    def counting(model_, method):
        calls.append(method.spec())
        return contextlib.nullcontext(model_)

    per_query = "dynamic-ntk:scale=2,per_query=True"  # recorded under its canonical text
    records = run(model, tokenizer, docs, ["rope", "dynamic-ntk:scale=2", per_query], [16, 32, W], protocol="position",
                  apply_method=counting)
    rope = [r for r in records if r["method"] == "rope"]
    dyn = [r for r in records if r["method"] == "dynamic-ntk:scale=2"]
    assert [r["length"] for r in rope] == [W, W]  # one forward per document, at the window
    # dynamic-ntk per_query=true is prefix-consistent: one forward serves every length
    assert [(r["length"], r["prefix_consistent"]) for r in records
            if r["method"] == ropelab.parse_method(per_query).spec()] == [(W, True)] * 2
    assert sorted(r["length"] for r in dyn) == [16, 16, 32, 32, W, W]  # length-dependent: one per length
    direct = token_losses(model, docs[0].ids)
    assert rope[0]["losses"] == pytest.approx(direct.tolist(), abs=1e-5)
    assert calls == ["rope", "dynamic-ntk:scale=2", ropelab.parse_method(per_query).spec()]  # each once for all its jobs


def test_sliding_window_scores_every_token_once(model, tokenizer, docs):
    records = run(model, tokenizer, docs[:1], ["rope"], [16], protocol="sliding", stride=8, window=W)
    (r,) = [r for r in records if r["length"] == 16]
    ids = docs[0].ids
    assert len(r["losses"]) == W - 1 and r["forwards"] == 5  # windows start at 0, 8, 16, 24, 32
    first = token_losses(model, ids[:16])
    assert r["losses"][:15] == pytest.approx(first.tolist(), abs=1e-5)
    third = token_losses(model, ids[16:32])  # scores tokens 24..31 with 8..15 tokens of context
    assert r["losses"][23:31] == pytest.approx(third[-8:].tolist(), abs=1e-5)


def test_resume_after_crash_loses_nothing_and_duplicates_nothing(model, tokenizer, docs, tmp_path):
    out = tmp_path / "run"
    run(model, tokenizer, docs, ["rope"], [16, 32], targets=8, out=out)
    path = out / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 4  # protocol + 2 documents × 2 lengths
    # Simulate kill -9 in the middle of writing the 4th record: keep 3 whole lines and half of one.
    path.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    torn = path.read_bytes()
    assert len(read_file(path).records) == 2  # a reader ignores the torn line ...
    assert path.read_bytes() == torn  # ... and leaves the file as it is: only the lock holder repairs it
    records = run(model, tokenizer, docs, ["rope"], [16, 32], targets=8, out=out)
    final = [json.loads(line) for line in path.read_text().splitlines()]
    assert final[0]["type"] == "protocol"
    keys = [r["key"] for r in final[1:]]
    assert len(keys) == len(set(keys)) == 4  # nothing duplicated, nothing lost
    assert {r["key"] for r in records} == set(keys)
    # A clean rerun does no work.
    before = path.read_bytes()
    run(model, tokenizer, docs, ["rope"], [16, 32], targets=8, out=out)
    assert path.read_bytes() == before


def test_failures_are_recorded_and_the_sweep_goes_on(model, tokenizer, docs, tmp_path):
    def flaky(model_, method):
        if method.name == "ntk":
            raise RuntimeError("injected patch failure")
        return contextlib.nullcontext(model_)

    records = run(model, tokenizer, docs, ["rope", "ntk:scale=0.5", "ntk:scale=2", "rope:logn=true"], [16, 32],
                  targets=8, out=tmp_path, apply_method=flaky)
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    assert all(r["status"] == "ok" for r in by["rope"])
    assert all(r["status"] == "error" and "scale=0.5" in r["error"] for r in by["ntk:scale=0.5"])
    assert all(r["status"] == "error" and "injected" in r["error"] for r in by["ntk:scale=2"])
    assert len(by[ropelab.parse_method("rope:logn=true").spec()]) == 4  # after the failures, the next method still ran
    # Failed jobs are retried on the next run; successful ones are not.
    again = run(model, tokenizer, docs, ["rope", "ntk:scale=2"], [16, 32], targets=8, out=tmp_path)
    assert all(r["status"] == "ok" for r in again)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 16 + 4


def test_job_exceptions_are_recorded(model, tokenizer, docs, monkeypatch):
    from ropelab.evals.protocols import Protocol

    real = Protocol.score

    def oom_at_32(self, model_, ids, length, chunk):
        if length == 32:
            raise MemoryError("simulated out of memory")
        return real(self, model_, ids, length, chunk)

    monkeypatch.setattr(Protocol, "score", oom_at_32)
    records = run(model, tokenizer, docs, ["rope"], [16, 32, W], targets=8)
    assert sorted((r["length"], r["status"]) for r in records) == [
        (16, "ok"), (16, "ok"), (32, "error"), (32, "error"), (W, "ok"), (W, "ok")]


def test_bad_protocol_inputs_name_the_field(model, tokenizer, docs, tmp_path):
    with pytest.raises(ValueError, match="targets=16"):
        run(model, tokenizer, docs, ["rope"], [16, 32], targets=16)
    with pytest.raises(ValueError, match="protocol='perplexity'"):
        run(model, tokenizer, docs, ["rope"], [16], protocol="perplexity")
    run(model, tokenizer, docs, ["rope"], [16, 32], targets=8, out=tmp_path)
    with pytest.raises(ValueError, match="different protocol"):
        run(model, tokenizer, docs, ["rope"], [16, 32], targets=4, out=tmp_path)
