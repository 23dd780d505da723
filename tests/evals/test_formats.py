"""Long-text formats: plain-text folders, JSONL with a text field, Parquet; bad input named."""

import gzip
import json

import pytest

from ropelab.evals.formats import read_documents, split_field


def test_plain_text_folder_like_pg19(tmp_path):
    books = tmp_path / "pg19" / "test"
    books.mkdir(parents=True)
    (books / "2.txt").write_text("Second book. " * 10)
    (books / "1.txt").write_text("First book. " * 10)
    (books / "empty.txt").write_text("  \n")
    (books / "cover.bin").write_bytes(b"\xff\xfe\x00\x81")
    docs = list(read_documents(str(tmp_path / "pg19")))
    assert [d.id.split("#")[0] for d in docs] == ["test/1.txt", "test/2.txt"]
    assert docs[0].text.startswith("First book.") and len(docs[0].id.split("#")[1]) == 12


def test_jsonl_text_field_gz_and_named_field(tmp_path):
    rows = [{"text": "alpha " * 5, "meta": 1}, {"text": ""}, {"text": "beta " * 5}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gamma"}) + "\n")
    docs = list(read_documents(str(tmp_path / "a.jsonl")))
    assert [d.id.split("#")[0] for d in docs] == ["a.jsonl/1", "a.jsonl/3"]
    assert [d.text for d in read_documents(str(tmp_path / "b.jsonl.gz") + ":body")] == ["gamma"]
    assert split_field("/x/y.jsonl:abstract") == (tmp_path.__class__("/x/y.jsonl"), "abstract")


def test_jsonl_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no 'text' field \(has: body\)"):
        list(read_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "torn.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        list(read_documents(str(tmp_path / "torn.jsonl")))
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="'text' must be a string, not int"):
        list(read_documents(str(tmp_path / "num.jsonl")))
    with pytest.raises(ValueError, match="no such file or folder"):
        read_documents(str(tmp_path / "missing.jsonl"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")  # optional extra: ropelab[parquet]
    import pyarrow.parquet as pq

    table = pa.table({"text": ["one " * 4, None, "", "four " * 4], "id": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)  # two row groups, read one at a time
    docs = list(read_documents(str(tmp_path / "d.parquet")))
    assert [d.id.split("#")[0] for d in docs] == ["d.parquet/1", "d.parquet/4"]
    with pytest.raises(ValueError, match=r"no 'body' column \(columns: text, id\)"):
        list(read_documents(str(tmp_path / "d.parquet") + ":body"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(table, mixed / "p.parquet")
    (mixed / "q.txt").write_text("plain")
    assert [d.id.split("#")[0] for d in read_documents(str(mixed))] == ["p.parquet/1", "p.parquet/4", "q.txt"]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    import importlib.util

    # as if pyarrow were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else object())
    with pytest.raises(ValueError, match=r"pip install 'ropelab\[parquet\]'"):
        read_documents(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match=r"pip install 'ropelab\[parquet\]'"):
        next(read_documents(str(tmp_path)))
