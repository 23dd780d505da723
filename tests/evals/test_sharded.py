"""Sweeps sharded over torchrun ranks (gloo, localhost, tiny model): the merged shards equal a
single process's run bit for bit; a rank killed with SIGKILL loses only the jobs in flight and
a rerun with another world size completes the run without repeating a job; ranks given
different parameters are all refused before any job; ranks without jobs exit 0. And, in one
process, the store's side: locks between shard and unsharded writers, done merged over shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import snapshot

from ropelab.evals.results import ResultStore, RunLocked, read_file, read_run, run_files

WORKER = str(Path(__file__).with_name("shard_worker.py"))
METHODS = "rope,ntk:scale=2,rerope:window=8"


def eval_args(model_dir, text_dir, out, methods=METHODS, documents=True):
    args = ["eval", "--model", str(model_dir), "--data", str(text_dir), "--methods", methods, "--lengths", "32,64",
            "--targets", "16", "--short", "concatenate", "--out", str(out), "--quiet"]
    return args + (["--documents", "2"] if documents else [])


def launch(nproc, *program):
    """torchrun (one thread per process, as the single-process runs here) on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *program]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def single(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ropelab", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def by_key(run):
    return {r["key"]: r for r in read_run(run).records}


def all_records(run):
    return [r for path in run_files(run, "perplexity") for r in read_file(path).records]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_results_exactly(model_dir, text_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = single(*eval_args(model_dir, text_dir, one))
    assert result.returncode == 0, result.stderr[-2000:]
    result = launch(2, "-m", "ropelab", *eval_args(model_dir, text_dir, two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (two / "results.jsonl").exists() and (two / "report.md").is_file()
    shards = [read_file(two / f"results.shard-rank{r}.jsonl").records for r in range(2)]
    assert all(shards) and len(shards[0]) + len(shards[1]) == 12  # both ranks worked; every job once
    a, b = by_key(one), by_key(two)
    assert len(a) == 12 and a.keys() == b.keys()
    for key in a:  # float32 per-position losses, bit for bit (one thread per process on both sides)
        assert b[key]["status"] == "ok" and b[key]["losses"] == a[key]["losses"]


@pytest.mark.slow
def test_a_killed_rank_loses_only_its_jobs_in_flight(model_dir, text_dir, tmp_path):
    run = tmp_path / "run"
    killed = launch(2, WORKER, "kill", *eval_args(model_dir, text_dir, run))
    assert killed.returncode != 0
    before = {path.name: read_file(path).records for path in run_files(run, "perplexity")}
    rank1 = before["results.shard-rank1.jsonl"]
    assert rank1 and len({r["method"] for r in rank1}) == 1 and all(r["status"] == "ok" for r in rank1)
    # rerun with another world size: 3 ranks take what is left
    result = launch(3, "-m", "ropelab", *eval_args(model_dir, text_dir, run))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, records in before.items():  # everything finished before the kill is kept as it was
        assert read_file(run / name).records[: len(records)] == records
    records = all_records(run)
    assert len(records) == 12 and len({r["key"] for r in records}) == 12  # complete, no job twice
    assert all(r["status"] == "ok" for r in records)
    # and once more as a single process: nothing left to do, no record added
    result = single(*eval_args(model_dir, text_dir, run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert all_records(run) == records


@pytest.mark.slow
def test_ranks_that_disagree_are_all_refused_and_idle_ranks_exit_0(model_dir, text_dir, tmp_path):
    run = tmp_path / "run"
    result = launch(2, WORKER, "differ", *eval_args(model_dir, text_dir, run, documents=False))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("the ranks of one run must run the same sweep") == 2 and "documents" in output
    assert snapshot(run) is None  # refused before anything was written
    # one job (one method, one length, one document) on 3 ranks: two have nothing to do
    result = launch(3, "-m", "ropelab", "eval", "--model", str(model_dir), "--data", str(text_dir), "--lengths",
                    "32", "--targets", "16", "--short", "concatenate", "--out", str(run), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(all_records(run)) == 1


HEADER = {"kind": "perplexity", "model": "m", "model_key": "k", "name": "fixed-target"}


def rec(key, status="ok"):
    return {"type": "perplexity", "key": key, "method": "rope", "params": {}, "status": status}


def test_shard_writers_share_a_run_but_exclude_an_unsharded_writer(tmp_path):
    with ResultStore(tmp_path, "perplexity", "rank0") as a, ResultStore(tmp_path, "perplexity", "rank1") as b:
        with pytest.raises(RunLocked):
            ResultStore(tmp_path, "perplexity")  # an unsharded run would run the same jobs
        with pytest.raises(RunLocked):
            ResultStore(tmp_path, "perplexity", "rank1")  # one writer per shard
        a.begin(HEADER)
        b.begin(HEADER)
        a.append(rec("j0"))
        b.append(rec("j1", "error"))
    with ResultStore(tmp_path, "perplexity") as whole:
        with pytest.raises(RunLocked):
            ResultStore(tmp_path, "perplexity", "rank0")
        whole.begin(HEADER)
        assert whole.done() == {"j0"}  # done is merged over the shards: j1 failed, so it runs again
        whole.append(rec("j1"))
    # a success in any file wins over a failure in another, whatever the files' order
    assert {r["key"]: r["status"] for r in read_run(tmp_path).records} == {"j0": "ok", "j1": "ok"}
    with ResultStore(tmp_path, "perplexity", "rank1") as again:
        assert again.done() == {"j0", "j1"}
        assert {r["key"]: r["status"] for r in again.merged()} == {"j0": "ok", "j1": "ok"}


@pytest.mark.slow
def test_passkey_on_two_ranks_gives_the_single_process_answers(model_dir, tmp_path):
    args = ["passkey", "--model", str(model_dir), "--methods", "rope,ntk:scale=2", "--lengths", "256,512",
            "--depths", "0.1,0.9", "--quiet"]
    result = single(*args, "--out", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr[-2000:]
    result = launch(2, "-m", "ropelab", *args, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = ({r["key"]: r for r in read_run(tmp_path / name, "passkey").records} for name in ("one", "two"))
    assert len(a) == 8 and a.keys() == b.keys()
    assert all(b[k]["status"] == "ok" and b[k]["answer"] == a[k]["answer"] for k in a)
    assert all(read_file(tmp_path / "two" / f"passkey.shard-rank{r}.jsonl").records for r in range(2))
