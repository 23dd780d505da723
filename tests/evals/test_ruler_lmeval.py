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


def test_ropelab_lm_eval_writes_and_runs_the_ruler_tasks_it_is_asked_for(model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'ropelab[lmeval]'")
    from ropelab.evals.cli import main

    out = tmp_path / "lm"
    assert main(["lm-eval", "--model", str(model_dir), "--tasks", "ropelab_ruler_passkey", "--passkey-lengths", "300,400",
                 "--max-length", "512", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "tasks" / "ropelab_ruler_passkey.jsonl").read_text().splitlines()]
    assert [r["length"] for r in rows] == [300, 400]
    task = json.loads((out / "lm_eval.json").read_text())["results"]["ropelab_ruler_passkey"]
    assert task["sample_len"] == 2 and 0.0 <= task["string_match,none"] <= 1.0


def test_an_unknown_ruler_task_name_is_refused_before_loading(tmp_path, capsys):
    from ropelab.evals.cli import main

    assert main(["lm-eval", "--model", "no-such-model", "--tasks", "ropelab_ruler_paskey", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tasks: task='ropelab_ruler_paskey': no such RULER-style task; did you mean 'ropelab_ruler_passkey'" in err
    assert not (tmp_path / "o").exists()
