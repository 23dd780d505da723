"""Running RULER-style samples: records, resume, errors, intervals, effective length, the command."""

import contextlib
import json

import pytest

from ropelab.evals import cli
from ropelab.evals.ruler import make_samples
from ropelab.evals.ruler_run import (
    RULER_THRESHOLD, answer, depth_table, effective_length, relative_threshold, ruler, task_table,
)
from ropelab.evals.results import read_run

unpatched = lambda m, method: contextlib.nullcontext(m)  # noqa: E731


def test_ruler_jobs_record_resume_and_errors(model, tokenizer, tmp_path):
    out = tmp_path / "run"
    kw = dict(depths=[0.5], samples=2, chat_template="off", out=out, apply_method=unpatched, progress=False)
    records = ruler(model, tokenizer, "passkey", ["rope", "nope:x=1"], [400], **kw)
    assert len(records) == 4
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["score"] in (0.0, 1.0) and isinstance(r["prediction"], str) for r in ok)
    assert all("nope" in r["method"] and r["error"].startswith("ValueError") for r in records if r["status"] == "error")
    assert ok[0]["params"] == {"protocol": "ruler", "seed": 0, "chat_template": "off"}
    assert json.loads(ok[0]["key"])[3] == {"task": "passkey", "length": 400, "depth": 0.5, "index": 0}
    # the stored prediction is what greedy generation gives for that sample
    (sample,) = [s for s in make_samples(tokenizer, ["passkey"], [400], [0.5], 2, chat_template="off") if s.index == 0]
    assert ok[0]["prediction"] == answer(model, tokenizer, sample)
    lines = len((out / "ruler.jsonl").read_text().splitlines())
    again = ruler(model, tokenizer, ["passkey"], ["rope"], [400], **kw)  # resumed: nothing run, nothing written
    assert len(again) == 2 and len((out / "ruler.jsonl").read_text().splitlines()) == lines
    seeded = ruler(model, tokenizer, ["passkey"], ["rope"], [400], seed=1, **kw)  # another seed: new jobs, own row
    assert len(seeded) == 2 and all(r["params"]["seed"] == 1 for r in seeded)
    assert set(task_table(read_run(out, "ruler").records)["passkey"]) == {"rope [seed=0]", "rope [seed=1]"}  # errors: no row


def test_ruler_refuses_before_writing(model, tokenizer, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="length=8: task 'passkey' needs at least"):
        ruler(model, tokenizer, ["passkey"], ["rope"], [8], out=out, apply_method=unpatched, progress=False)
    with pytest.raises(ValueError, match="task='paskey'"):
        ruler(model, tokenizer, ["paskey"], ["rope"], [400], out=out, apply_method=unpatched, progress=False)
    assert not out.exists()


def test_depth_table_cells():
    recs = [{"status": "ok", "task": "niah-single", "method": "rope", "length": 1024, "depth": d, "score": s,
             "params": {"protocol": "ruler"}, "model_key": "k"} for d, s in ((0.1, 1.0), (0.1, 0.0), (0.9, 1.0))]
    assert depth_table(recs) == {"niah-single": {"rope": {(1024, 0.1): 0.5, (1024, 0.9): 1.0}}}


def test_task_table_intervals():
    recs = [{"status": "ok", "task": "passkey", "method": "rope", "length": 1024, "score": s, "params": {}, "model_key": "k"}
            for s in (1, 1, 0, 1)]
    cell = task_table(recs)["passkey"]["rope"][1024]
    assert cell.mean == 0.75 and cell.interval.low < 0.75 < cell.interval.high and "Wilson" in cell.interval.how
    partial = [{**recs[0], "task": "niah-multivalue", "score": s} for s in (0.5, 0.25, 1.0)]
    cell = task_table(partial)["niah-multivalue"]["rope"][1024]  # too few partial scores for a bootstrap
    assert cell.mean == pytest.approx(1.75 / 3, abs=1e-15) and cell.interval is None
    assert cell.why_none == "3 samples with partial scores: a bootstrap interval needs at least 10"
    cell = task_table(partial * 4)["niah-multivalue"]["rope"][1024]
    assert cell.interval is not None and "bootstrap" in cell.interval.how


def test_effective_length_is_rulers_definition():
    scores = {1024: 95.0, 2048: 90.0, 4096: 80.0, 8192: 88.0}
    assert effective_length(scores, RULER_THRESHOLD) == 2048  # 8k's 88 does not count: 4k fell below first
    assert effective_length({1024: 10.0}, RULER_THRESHOLD) is None
    assert relative_threshold({1024: 40.0, 2048: 30.0}) == pytest.approx(0.85 * 40.0, abs=1e-12)
    assert effective_length({1024: 40.0, 2048: 36.0, 4096: 20.0}, relative_threshold({1024: 40.0})) == 2048
    with pytest.raises(ValueError, match="fraction=0"):
        relative_threshold({1: 1.0}, 0)


def test_command_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["ruler", "--model", str(model_dir), "--lengths", "300", "--depths", "0.5", "--samples", "1", "--quiet",
              "--out", str(out)]
    assert cli.main([*common, "--tasks", "passkey"]) == 0
    lines = (out / "ruler.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "ruler" and json.loads(lines[1])["task"] == "passkey"
    assert "passkey (mean score, 95% interval)" in capsys.readouterr().out
    assert cli.main([*common, "--tasks", "niah-single", "--chat-template", "off"]) == 0  # another task, same directory
    assert len((out / "ruler.jsonl").read_text().splitlines()) == 3
    assert cli.main([*common, "--tasks", "passkey"]) == 0  # resumed: nothing new
    assert len((out / "ruler.jsonl").read_text().splitlines()) == 3
    assert cli.main(["plot", str(out)]) == 0 and (out / "ruler_passkey.png").is_file()
    assert "### niah-single" in (out / "report.md").read_text()
    assert cli.main(["ruler", "--model", str(model_dir), "--tasks", "paskey", "--out", str(tmp_path / "b")]) == 2
    assert "did you mean 'passkey'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.slow
def test_default_model_finds_a_single_needle_at_1k():
    """SmolLM2-135M with its chat template answers niah-single at 1k, depth 0.5 (measured: 3/3 depths)."""
    import ropelab

    model, tok = ropelab.load_default_model()
    (record,) = ruler(model, tok, ["niah-single"], ["rope"], [1024], [0.5], chat_template="on", apply_method=unpatched,
                      progress=False)
    assert record["score"] == 1.0, record["prediction"]


def test_a_run_with_too_few_partial_scores_is_reported_without_those_intervals(model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """Three samples of a multi-value task give partial scores, too few for a bootstrap interval:
    the run ends 0 and `ropelab plot` reports it (before, both exited 2), the mean alone in those
    cells, said so."""
    import ropelab.evals.ruler_run as ruler_run

    def half_the_values(model, tokenizer, sample):  # a model that finds half of the needles' values
        return " ".join(sample.answers[: len(sample.answers) // 2])

    monkeypatch.setattr(ruler_run, "answer", half_the_values)
    out = tmp_path / "run"
    argv = ["ruler", "--model", str(model_dir), "--methods", "rope,yarn:scale=2", "--tasks", "niah-multivalue,passkey",
            "--lengths", "400", "--depths", "0.5", "--samples", "3", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    assert "(no interval: 3 samples with partial scores" in capsys.readouterr().out
    scores = {r["score"] for r in read_run(out, "ruler").records}
    assert scores == {0.5, 0.0}  # multivalue: 2 of 4 values; passkey: 0 of its 1
    for _ in range(2):  # `ropelab plot` on the folder, as often as asked
        assert cli.main(["plot", str(out)]) == 0
        report = (out / "report.md").read_text()
        assert "| `rope` | 0.50 (no interval) |" in report and "| `yarn:scale=2` | 0.50 (no interval) |" in report
        assert "| `rope` | 0.00 [0.00, 0.56] |" in report  # 0/1 scores: Wilson, whatever the count
        assert "niah-multivalue `rope` 400: 3 samples with partial scores: a bootstrap interval needs at least 10" in report
