"""The result store: locks, readers that never write, torn tails, stray lines, schema, shards,
and summaries that never mix records made with different parameters (issue 8, items 4, 5, 8)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from ropelab.evals import results
from ropelab.evals.results import SCHEMA, ResultStore, RunLocked, read_file, read_run
from ropelab.evals.summary import load, skipped_lines, table

HEADER = {"kind": "perplexity", "model": "m", "name": "fixed-target"}


def rec(i, params=None, method="rope", length=32):
    params = params or {"protocol": "fixed-target", "window": 32, "targets": 8}
    return {"type": "perplexity", "key": f"k{i}-{json.dumps(params)}-{method}", "method": method, "params": params,
            "document": f"d{i}", "length": length, "status": "ok", "loss": 1.0 + i, "scored_tokens": 8}


WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    # results.py needs only the standard library: load it alone (importing ropelab.evals loads torch: seconds)
    spec = importlib.util.spec_from_file_location("results", sys.argv[5])
    results = sys.modules["results"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    ResultStore, RunLocked = results.ResultStore, results.RunLocked
    run, shard, count, pause = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), float(sys.argv[4])
    try:
        with ResultStore(run, "perplexity", shard) as store:
            store.begin({"kind": "perplexity", "model": "m", "name": "fixed-target"})
            print("started", flush=True)
            for i in range(count):
                store.append({"type": "perplexity", "key": f"{shard}-{i}", "method": "rope", "params": {},
                              "document": "d", "length": i + 2, "status": "ok", "loss": 1.0, "scored_tokens": 1,
                              "losses": [0.5] * 200})
                time.sleep(pause)
            sys.stdin.readline()  # hold the lock until the test says so
    except RunLocked as exc:
        print("refused:", exc, flush=True)
        sys.exit(3)
""")


def start_writer(run, shard, count, pause):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(run), shard or "", str(count), str(pause), results.__file__],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_two_independent_writers_one_is_refused_and_a_reader_sees_only_whole_records(tmp_path):
    run = tmp_path / "run"
    first = start_writer(run, None, 60, 0.02)
    assert first.stdout.readline().strip() == "started"
    second = start_writer(run, None, 60, 0.0)  # same file: refused whenever it arrives (the first holds the lock)
    seen, sizes, deadline = [], [], time.monotonic() + 120
    while not seen or seen[-1] < 60:  # read while the first writes: nothing torn, file never cut, never fewer
        assert time.monotonic() < deadline
        sizes.append((run / "results.jsonl").stat().st_size)
        contents = read_file(run / "results.jsonl")
        assert contents.skipped == [] and contents.header["schema"] == SCHEMA
        seen.append(len(contents.records))
    out2, _ = second.communicate(timeout=120)
    assert second.returncode == 3 and f"out={str(run)!r}" in out2 and "another ropelab process" in out2
    first.communicate("finish\n", timeout=120)
    assert first.returncode == 0
    final = read_file(run / "results.jsonl")
    keys = [r["key"] for r in final.records]
    assert keys == [f"None-{i}" for i in range(60)]  # all 60, in order, once each, from the first writer only
    assert seen == sorted(seen) and sizes == sorted(sizes) and len(set(seen)) > 2  # it read mid-run


def test_the_shards_of_one_run_write_at_once_and_merge(tmp_path):
    run = tmp_path / "run"
    writers = [start_writer(run, f"rank{r}", 40, 0.002) for r in range(2)]
    for w in writers:
        w.communicate("finish\n", timeout=120)
        assert w.returncode == 0
    contents = read_run(run)
    keys = sorted(r["key"] for r in contents.records)
    assert keys == sorted(f"rank{r}-{i}" for r in range(2) for i in range(40)) and contents.skipped == []


def test_two_stores_in_one_process_cannot_both_write(tmp_path):
    with ResultStore(tmp_path, "perplexity") as store:
        with pytest.raises(RunLocked):
            ResultStore(tmp_path, "perplexity")
        store.begin(HEADER)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["type"] == "protocol"  # one header
    with ResultStore(tmp_path, "perplexity") as store:  # released: the next writer opens it
        store.begin(HEADER)
        store.append(rec(0))
    assert len(read_file(tmp_path / "results.jsonl").records) == 1


def test_readers_never_repair_only_the_lock_holder_does(tmp_path):
    with ResultStore(tmp_path, "perplexity") as store:
        store.begin(HEADER)
        store.append(rec(0))
        store.append(rec(1))
    path = tmp_path / "results.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"type":"perplexity","key":"torn')  # a write cut short
    torn = path.read_bytes()
    assert len(read_run(tmp_path).records) == 2 and load(tmp_path)[0]["schema"] == SCHEMA
    assert skipped_lines(tmp_path) == [] and path.read_bytes() == torn  # readers leave the file alone
    with ResultStore(tmp_path, "perplexity") as store:
        assert path.read_bytes() == whole  # the writer cut the torn tail
        assert len(store.done()) == 2


def test_stray_json_lines_are_skipped_and_reported_with_line_numbers(tmp_path):
    with ResultStore(tmp_path, "perplexity") as store:
        store.begin(HEADER)
        store.append(rec(0))
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('[1,2,3]\n{"hello":1}\nnot json\n')
    with ResultStore(tmp_path, "perplexity") as store:
        store.begin(HEADER)
        store.append(rec(1))
    assert skipped_lines(tmp_path) == ["results.jsonl line 3: a JSON list, not a record",
                                       "results.jsonl line 4: a JSON object without key, method and status",
                                       "results.jsonl line 5: not JSON"]
    assert [r["document"] for r in read_run(tmp_path).records] == ["d0", "d1"]


def test_records_with_different_parameters_never_share_a_cell(tmp_path):
    a = {"protocol": "fixed-target", "window": 32, "targets": 8}
    b = {"protocol": "fixed-target", "window": 32, "targets": 16}
    with ResultStore(tmp_path, "perplexity") as store:
        store.begin(HEADER)
        store.append(rec(0, a))
        store.append(rec(1, b))
    rows = table(None, read_run(tmp_path).records)
    assert rows == {"rope [targets=8]": {32: 1.0}, "rope [targets=16]": {32: 2.0}}


def test_a_newer_schema_is_refused_too(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"type": "protocol", "schema": SCHEMA + 1}) + "\n")
    with pytest.raises(ValueError, match=f"schema {SCHEMA + 1}"):
        ResultStore(tmp_path, "perplexity")
