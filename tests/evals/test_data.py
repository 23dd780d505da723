"""Corpora: deterministic stdlib selection, files and folders, the short-document policy."""

import sysconfig
from pathlib import Path

import pytest

from ropelab.evals.data import iter_documents, select_documents, stdlib_files


def test_stdlib_is_deterministic_and_skips_tests(tokenizer):
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative) and len(relative) == len(set(relative))  # the documented order, no repeats
    assert "os.py" in relative and "json/decoder.py" in relative  # the files every CPython ships
    assert not any("/test/" in f.as_posix() for f in files)
    a = select_documents("stdlib", tokenizer, 256, 2)
    b = select_documents("stdlib", tokenizer, 256, 2)
    assert [d.id for d in a] == [d.id for d in b] and a[0].ids == b[0].ids
    assert all(len(d.ids) == 256 for d in a) and a[0].id.startswith("stdlib/")


def test_folder_skip_and_concatenate(tokenizer, text_dir):
    docs = list(iter_documents(str(text_dir)))
    assert [d.id.split("#")[0] for d in docs] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    longest = max(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
    with pytest.raises(ValueError, match="only 0 of 1 documents reach"):
        select_documents(str(text_dir), tokenizer, longest + 1, 1, short="skip")
    (joined,) = select_documents(str(text_dir), tokenizer, longest + 1, 1, short="concatenate")
    assert len(joined.ids) == longest + 1 and "+1" in joined.id  # spans two files, and says so
    (single,) = select_documents(str(text_dir / "doc2.txt"), tokenizer, 64, 1)
    assert single.id.startswith("doc2.txt#")


def test_bad_sources_name_the_field(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data='/nonexistent'"):
        list(iter_documents("/nonexistent"))
    with pytest.raises(ValueError, match="short='pad'"):
        select_documents("stdlib", tokenizer, 64, 1, short="pad")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load the dataset|pip install datasets"):
        list(iter_documents("hf:surely-not-a-dataset-ropelab"))
