"""The report's evidence: intervals and paired tie marks in the loss table, the one-window note, the
RULER tables and the section tying loss and retrieval with effective lengths."""

import contextlib
import re

import numpy as np
import pytest

from ropelab.evals import perplexity, write_report
from ropelab.evals.evidence import effective_lengths, loss_comparisons, ruler_by_length, scored_losses
from ropelab.evals.plots import run_figures
from ropelab.evals.ruler_run import RULER_THRESHOLD, ruler
from ropelab.evals.uncertainty import compare

unpatched = lambda m, method: contextlib.nullcontext(m)  # noqa: E731


def fake(method, doc, losses, length=64, targets=32, status="ok"):
    return {"status": status, "method": method, "model_key": "k", "document": doc, "length": length,
            "params": {"protocol": "fixed-target", "window": length, "targets": targets}, "losses": list(losses),
            "loss": float(np.mean(losses[-targets:])), "scored_tokens": targets, "key": f"{method}{doc}{length}"}


def test_tie_marks_follow_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    content = [rng.normal(3, 1, 64) for _ in range(2)]
    recs = [fake("a", f"d{i}", c) for i, c in enumerate(content)]
    recs += [fake("b", f"d{i}", c + 0.001 + rng.normal(0, 0.01, 64)) for i, c in enumerate(content)]  # a tie
    recs += [fake("c", f"d{i}", c + 1.0) for i, c in enumerate(content)]  # clearly worse
    cells = loss_comparisons(recs)
    assert cells["a"][64].best and cells["a"][64].tied and cells["b"][64].tied and not cells["c"][64].tied
    # the same numbers as uncertainty.compare on the scored tokens (the last 32 of each record)
    direct = compare({m: [np.asarray(r["losses"][-32:]) for r in recs if r["method"] == m] for m in "abc"})
    assert cells["c"][64].interval == direct.intervals["c"] and direct.indistinguishable == ["a", "b"]
    assert set(scored_losses(recs)["a"][64]) == {"d0", "d1"}


def test_effective_lengths_both_thresholds():
    scores = {"rope": {1024: 90.0, 2048: 50.0}, "yarn": {1024: 80.0, 2048: 78.0, 4096: 10.0}}
    relative, eff = effective_lengths(scores)
    assert relative == pytest.approx(0.85 * 90.0)
    assert eff == {"rope": (1024, 1024), "yarn": (None, 2048)}  # yarn's 80 < 85.6 but >= 76.5
    assert effective_lengths({"rope": {1024: 0.0}}) == (None, {"rope": (None, None)})
    recs = [{"status": "ok", "method": "rope", "model_key": "k", "params": {}, "task": t, "length": 1024, "score": s}
            for t, s in (("a", 1.0), ("a", 0.0), ("b", 1.0))]
    assert ruler_by_length(recs) == {"rope": {1024: pytest.approx(75.0)}}  # tasks weighted equally: (50 + 100) / 2


def test_report_has_intervals_the_one_window_note_and_the_evidence_section(model, tokenizer, text_dir, tmp_path):
    run = tmp_path / "run"
    perplexity(model, tokenizer, str(text_dir), ["rope", "linear:scale=2"], [48, 64], targets=32, out=run,
               apply_method=unpatched, progress=False)  # unpatched: both rows are the same model, so they tie
    ruler(model, tokenizer, ["passkey", "niah-single"], ["rope"], [200, 300], [0.5], 1, chat_template="off", out=run,
          apply_method=unpatched, progress=False)
    text = write_report(run).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `rope` |"))
    assert len(re.findall(r"\*\*\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]\*\*", row)) == 2  # both lengths: interval, tied
    assert "token blocks of one window of one document only" in text
    assert "## RULER-style tasks" in text and "### passkey" in text and "### niah-single" in text
    assert "## Loss and retrieval by context length" in text and f"effective ({RULER_THRESHOLD})" in text
    assert "model-relative one is 0.85" in text
    section = text.split("## Loss and retrieval by context length")[1]
    evidence_row = next(line for line in section.splitlines() if line.startswith("| `rope` |"))
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] / –", evidence_row)  # the loss carries its interval
    assert re.search(r"– / \d+% \|", evidence_row)  # 2 samples over 2 tasks: too few for the stratified bootstrap
    figures = run_figures(run)
    assert {"ruler_passkey", "ruler_niah-single"} <= set(figures)
    assert figures["ruler_passkey"].axes[0].get_title() == "rope"


def test_report_says_which_rows_have_a_per_position_line(tmp_path):
    import json

    from ropelab.evals.evidence import dense_rows
    from ropelab.evals.results import SCHEMA

    rng = np.random.default_rng(3)
    doc = rng.normal(2, 0.3, 127)
    recs = [{**fake(m, "d", doc, length=128), "prefix_consistent": pc, "seconds": 1.0, "tokens_per_second": 1.0,
             "peak_rss_mb": 1.0} for m, pc in (("rope", True), ("dynamic-ntk:scale=2", False))]
    assert dense_rows(recs) == (["rope"], ["dynamic-ntk:scale=2"])
    header = {"type": "protocol", "schema": SCHEMA, "kind": "perplexity", "name": "fixed-target", "window": 128,
              "targets": 32, "stride": 512, "data": "d", "short": "skip", "model": "m", "train_length": 64}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [header, *recs]))
    report = write_report(tmp_path).read_text()
    line = next(x for x in report.splitlines() if x.startswith("Figure `loss_vs_context`"))
    assert "prefix-consistent methods: `rope`." in line and "Points only" in line and "`dynamic-ntk:scale=2`" in line


def test_passkey_table_by_length_has_wilson_intervals():
    from ropelab.evals.report import passkey_by_length
    from ropelab.evals.uncertainty import wilson

    recs = [{"status": "ok", "method": "rope", "model_key": "k", "params": {}, "length": n, "depth": d, "correct": c}
            for n, d, c in ((1024, 0.1, True), (1024, 0.9, True), (2048, 0.1, True), (2048, 0.9, False),
                            (2048, 0.5, False))]
    rows = passkey_by_length(recs)["rope"]
    assert rows[1024].mean == 1.0 and (rows[1024].low, rows[1024].high) == wilson(2, 2)
    assert rows[2048].mean == pytest.approx(1 / 3) and (rows[2048].low, rows[2048].high) == wilson(1, 3)
