"""RULER-style tasks through the lm-eval bridge, offline, scored by RULER's string match."""

import json

import pytest

from ropelab.evals.ruler_lmeval import write_ruler_tasks


def test_task_files(tokenizer, tmp_path):
    names = write_ruler_tasks(tmp_path, tokenizer, ["niah-single", "passkey"], [400], depths=(0.2, 0.8))
    assert names == ["ropelab_ruler_niah_single", "ropelab_ruler_passkey"]
    rows = [json.loads(x) for x in (tmp_path / "ropelab_ruler_niah_single.jsonl").read_text().splitlines()]
    assert [r["depth"] for r in rows] == [0.2, 0.8] and all(r["answers"][0] in r["prompt"] for r in rows)
    assert "process_results: !function ropelab_ruler_utils.process_results" in (tmp_path / f"{names[0]}.yaml").read_text()
    with pytest.raises(ValueError, match="did you mean"):
        write_ruler_tasks(tmp_path / "bad", tokenizer, ["niah-singel"], [400])
    assert not (tmp_path / "bad").exists()


def test_runs_through_the_bridge(model, tokenizer, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'ropelab[lmeval]'")
    from ropelab.evals.lmeval import run_lm_eval

    (name,) = write_ruler_tasks(tmp_path, tokenizer, ["passkey"], [300], depths=(0.5,), samples=2, chat_template="off")
    result = run_lm_eval(model, tokenizer, [name], include_path=tmp_path, max_length=512)
    task = result["results"][name]
    assert task["sample_len"] == 2 and 0.0 <= task["string_match,none"] <= 1.0
