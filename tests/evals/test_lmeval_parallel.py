"""The lm-eval bridge under torchrun and accelerate launch (gloo, localhost, tiny model): lm-eval's own data-parallel
mode splits the requests over 2 ranks and gathers them to rank 0, whose results equal a single
process's; rank 0 alone writes the result store, and a rerun (any world size) resumes it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from evals_helpers import TEXT

from ropelab.evals.distributed import from_rank0
from ropelab.evals.lmeval import write_passkey_task
from ropelab.evals.results import read_file, run_files

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'ropelab[lmeval]'")

WORKER = str(Path(__file__).with_name("lmeval_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on both sides: the same sums


def write_loglikelihood_task(directory: Path) -> None:
    """`ropelab_ll`: 5 contexts of TEXT, each scored on its next 3 words (per-document float results)."""
    words = TEXT.split(" ")
    data = directory / "ropelab_ll.jsonl"
    data.write_text("".join(json.dumps({"context": " ".join(words[: 6 + 3 * i]),
                                        "target": " " + " ".join(words[6 + 3 * i: 9 + 3 * i])}) + "\n"
                            for i in range(5)))
    (directory / "ropelab_ll.yaml").write_text(
        "task: ropelab_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\nmetric_list:\n'
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def torchrun(nproc, *program):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *program]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def accelerate_launch(nproc, *program):
    """`accelerate launch --multi_gpu`: on CPU too it starts the processes through torchrun (gloo)."""
    with socket.socket() as free:  # accelerate's default port may be taken by another run here
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               f"--num_processes={nproc}", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
               f"--main_process_port={port}", *program]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def python(*program):
    return subprocess.run([sys.executable, *program], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_responses_and_metrics(model_dir, tokenizer, tmp_path):
    tasks = tmp_path / "tasks"
    write_passkey_task(tasks, tokenizer, [256, 384])  # 6 documents: 3 per rank
    write_loglikelihood_task(tasks)  # 5 documents: 3 and 2, so lm-eval pads rank 1 with a repeat
    names = "ropelab_passkey,ropelab_ll"
    result = python(WORKER, str(model_dir), str(tasks), str(tmp_path / "one.json"), names)
    assert result.returncode == 0, result.stderr[-2000:]
    result = torchrun(2, WORKER, str(model_dir), str(tasks), str(tmp_path / "two.json"), names)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for task, count in (("ropelab_passkey", 6), ("ropelab_ll", 5)):
        a, b = one["samples"][task], two["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] == list(range(count))  # every document once
        for x, y in zip(a, b):  # float32 log-likelihoods and generated text, bit for bit
            assert y["filtered_resps"] == x["filtered_resps"] and y["resps"][0][0] == x["resps"][0][0]
    for task, metrics in one["results"].items():
        for name, value in metrics.items():
            if name == "perplexity_stderr,none":
                # a bootstrap over the gathered per-document values, whose order lm-eval makes rank
                # by rank (0, 2, 4, 1, 3): resampling a reordered list draws other samples
                continue
            assert two["results"][task][name] == value, (task, name)


@pytest.mark.slow
def test_cli_under_accelerate_launch_writes_one_store_that_any_world_size_resumes(model_dir, tmp_path):
    args = ["-m", "ropelab", "lm-eval", "--model", str(model_dir), "--method", "ntk:scale=2", "--tasks",
            "ropelab_passkey", "--passkey-lengths", "256,384", "--limit", "5", "--max-length", "512", "--quiet"]
    result = python(*args, "--out", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "two"
    result = accelerate_launch(2, *args, "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in run_files(run, "lm-eval")] == ["lm_eval.jsonl"]  # rank 0 alone wrote, no shards
    records = read_file(run / "lm_eval.jsonl").records
    assert len(records) == 1 and records[0]["status"] == "ok"  # the job recorded once
    one = json.loads((tmp_path / "one" / "lm_eval.json").read_text())["results"]
    assert json.loads((run / "lm_eval.json").read_text())["results"] == one
    assert one["ropelab_passkey"]["sample_len"] == 5
    result = python(*args, "--out", str(run))  # a rerun as one process: nothing left to do
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_file(run / "lm_eval.jsonl").records == records


def test_from_rank0_in_one_process_is_a_plain_call():
    assert from_rank0(lambda: [1, 2]) == [1, 2]
    with pytest.raises(KeyError):  # raised as it is, not turned into another type
        from_rank0(lambda: {}["x"])


@pytest.mark.slow
def test_a_rank_failing_inside_a_job_stops_every_rank(model_dir, tokenizer, tmp_path):
    """A one-document task on 2 ranks: lm-eval gives rank 1 nothing and raises there; rank 1
    stops (it does not go on out of step with rank 0), torchrun stops rank 0, nothing is recorded."""
    tasks = tmp_path / "tasks"
    write_passkey_task(tasks, tokenizer, [256], depths=(0.5,))
    run = tmp_path / "run"
    result = torchrun(2, "-m", "ropelab", "lm-eval", "--model", str(model_dir), "--tasks", "ropelab_passkey",
                      "--include-path", str(tasks), "--max-length", "512", "--quiet", "--out", str(run))
    assert result.returncode != 0
    assert "ropelab lm-eval: failed: rank 1: task ropelab_passkey: ValueError" in result.stderr
    assert read_file(run / "lm_eval.jsonl").records == []  # the header only: the job was not recorded
