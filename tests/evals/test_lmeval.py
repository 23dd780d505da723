"""The lm-eval bridge, offline: a locally generated passkey task with --limit."""

import json

import pytest

from ropelab.evals.lmeval import write_passkey_task


def test_task_files(tokenizer, tmp_path):
    write_passkey_task(tmp_path, tokenizer, [256], depths=(0.5,), trials=2)
    rows = [json.loads(line) for line in (tmp_path / "ropelab_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["answer"] in r["prompt"] for r in rows)
    yaml = (tmp_path / "ropelab_passkey.yaml").read_text()
    assert "dataset_path: json" in yaml and "generate_until" in yaml and "regex" in yaml


def test_bridge_runs_offline_with_limit(model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'ropelab[lmeval]'")
    from ropelab.evals.cli import main

    out = tmp_path / "lm"
    rc = main(["lm-eval", "--model", str(model_dir), "--tasks", "ropelab_passkey", "--limit", "2",
               "--passkey-lengths", "256", "--max-length", "512", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "lm_eval.json").read_text())
    task = result["results"]["ropelab_passkey"]
    assert task["sample_len"] == 2 and 0.0 <= task["exact_match,digits"] <= 1.0
