"""Every `--data` form the docs name, through every command that reads a corpus (eval, tune, lab
train and lab eval), on a tiny random model: the documents a job scored (ids and text starts, as
stored in its records) are exactly the corpus's documents in reading order, never its raw bytes.

The forms: a text file, a folder mixing .txt, .jsonl and .parquet, JSONL with `text`,
`FILE.jsonl:FIELD`, gzip JSONL, `FILE.parquet:COLUMN`, `hf:` (a local dataset folder, offline)
and `stdlib`. `ropelab sweep-default` runs the main job on `stdlib` only (no `--data`);
`ropelab passkey` and `ropelab ruler` build their prompts from a fixed filler (no corpus).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
from evals_helpers import TEXT

from ropelab.evals.cli import main
from ropelab.evals.data import START_CHARS
from ropelab.evals.lab.corpus import is_heldout

HELDOUT_EVERY = 2  # the lab tests' split: 1 document in 2 held out


def doc_id(name: str, text: str) -> str:
    return f"{name}#{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def texts_for(names: list[str], label: str) -> dict[str, str]:
    """A distinct text per document name, salted so that under the lab's split the first document
    is held out and every other one trains (ids hash their text; the split hashes the ids); a
    single document trains."""
    out = {}
    for k, name in enumerate(names):
        salt = 0
        while True:
            text = f"Document {k} ({label}, salt {salt}). " + TEXT
            if is_heldout(doc_id(name, text), HELDOUT_EVERY) == (k == 0 and len(names) > 1):
                break
            salt += 1
        out[name] = text
    return out


def write_jsonl(path: Path, rows: list[dict], opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def build(form: str, root: Path) -> tuple[str, dict[str, str]]:
    """(the --data text, {document name: text} in reading order) for one form, written under root."""
    root.mkdir(parents=True, exist_ok=True)
    if form == "text":
        texts = texts_for(["corpus.txt"], form)
        (root / "corpus.txt").write_text(texts["corpus.txt"])
        return str(root / "corpus.txt"), texts
    if form == "folder":
        names = ["a.txt", "b.jsonl/1", "b.jsonl/3", "c/d.parquet/1", "c/d.parquet/3"]
        texts = texts_for(names, form)
        folder = root / "mixed"
        (folder / "c").mkdir(parents=True)
        (folder / "a.txt").write_text(texts["a.txt"])
        write_jsonl(folder / "b.jsonl", [{"text": texts["b.jsonl/1"], "n": 1}, {"text": ""}, {"text": texts["b.jsonl/3"]}])
        write_parquet(folder / "c" / "d.parquet", {"text": [texts["c/d.parquet/1"], None, texts["c/d.parquet/3"]]})
        (folder / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # binary: not a document
        return str(folder), texts
    if form in ("jsonl", "jsonl-field", "jsonl-gz"):
        file = {"jsonl": "c.jsonl", "jsonl-field": "d.jsonl", "jsonl-gz": "e.jsonl.gz"}[form]
        field = "body" if form == "jsonl-field" else "text"
        texts = texts_for([f"{file}/1", f"{file}/2", f"{file}/4"], form)
        rows = [{field: texts[f"{file}/1"], "title": "one"}, {field: texts[f"{file}/2"]}, {field: "  "},
                {field: texts[f"{file}/4"], "title": "four"}]
        write_jsonl(root / file, rows, gzip.open if file.endswith(".gz") else open)
        return str(root / file) + (":body" if form == "jsonl-field" else ""), texts
    if form == "parquet":
        texts = texts_for(["f.parquet/1", "f.parquet/2", "f.parquet/3"], form)
        write_parquet(root / "f.parquet", {"content": list(texts.values()), "id": [1, 2, 3]})
        return str(root / "f.parquet") + ":content", texts
    if form == "hf":
        folder = root / "dataset"
        folder.mkdir()
        names = [f"{folder}/test/0", f"{folder}/test/2", f"{folder}/test/3"]
        texts = texts_for(names, form)
        write_jsonl(folder / "test.jsonl", [{"text": texts[names[0]]}, {"text": ""}, {"text": texts[names[1]]},
                                            {"text": texts[names[2]]}])
        write_jsonl(folder / "train.jsonl", [{"text": "another split: never read " * 8}])
        return f"hf:{folder}", texts
    assert form == "stdlib"
    return "stdlib", {}


def expected_text(texts: dict[str, str], name: str) -> str:
    if name.startswith("stdlib/"):  # the file itself, as the reader reads it
        path = Path(sysconfig.get_paths()["stdlib"]) / name.removeprefix("stdlib/")
        return path.read_text(encoding="utf-8", errors="replace")
    return texts[name]


def check_scored(ids: list[str], starts: list[str], texts: dict[str, str], count: int) -> None:
    """The stored ids and text starts are the first `count` documents of the form, in order."""
    assert len(ids) == len(starts) == count, (ids, starts)
    if texts:
        names = list(texts)[:count]
        assert [i.split("#")[0] for i in ids] == names
    for stored_id, start in zip(ids, starts):
        name = stored_id.split("#")[0]
        text = expected_text(texts, name)
        assert stored_id == doc_id(name, text)  # the hash pins the whole text read
        assert start == text[:START_CHARS] and "{" not in start  # the text, not the JSON line around it


FORMS = ["text", "folder", "jsonl", "jsonl-field", "jsonl-gz", "parquet", "hf", "stdlib"]


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`hf:` sources read offline, with the datasets cache in this test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


@pytest.mark.parametrize("form", FORMS)
def test_eval_scores_the_documents_of_every_form(form, model_dir, tmp_path, offline_datasets):
    data, texts = build(form, tmp_path / "corpus")
    count = min(len(texts), 5) if texts else 2
    out = tmp_path / "run"
    assert main(["eval", "--model", str(model_dir), "--data", data, "--lengths", "48", "--targets", "16",
                 "--documents", str(count), "--out", str(out), "--quiet"]) == 0
    rows = records(out / "results.jsonl")
    assert all(r["status"] == "ok" for r in rows)
    check_scored([r["document"] for r in rows], [r["text_start"] for r in rows], texts, count)
    header = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert header["data"] == data  # the paths here are absolute already; a named field is kept


@pytest.mark.parametrize("form", FORMS)
def test_tune_scores_the_documents_of_every_form(form, model_dir, tmp_path, offline_datasets, capsys):
    data, texts = build(form, tmp_path / "corpus")
    count = 1 if form == "text" else 2
    out = tmp_path / "tune"
    assert main(["tune", "--model", str(model_dir), "--method", "ntk", "--target-length", "48", "--targets", "16",
                 "--param", "scale=1|2", "--documents", str(count), "--skip-documents", "0", "--data", data,
                 "--out", str(out)]) == 0
    rows = records(out / "tune.jsonl")
    assert len(rows) == 2
    for r in rows:
        check_scored(r["documents"], r["text_starts"], texts, count)


def lab_train(data: str, out: Path, tokenizer_dir) -> int:
    return main(["lab", "train", "--position", "rope", "--size", "micro", "--train-length", "16", "--batch-size", "2",
                 "--tokens", "64", "--heldout-every", str(HELDOUT_EVERY), "--tokenizer", str(tokenizer_dir),
                 "--data", data, "--out", str(out), "--quiet"])


def check_trained_on(run: Path, texts: dict[str, str]) -> None:
    """The training blocks are token runs of the training documents' texts (never of held-out ones
    or of JSON syntax)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    blocks = torch.load(run / "tokens.pt", weights_only=True).view(-1, 16)
    training = "<|endoftext|>".join(t for n, t in texts.items() if len(texts) == 1 or n != next(iter(texts)))
    for block in blocks:
        piece = tokenizer.decode(block.tolist())
        assert piece in training + "<|endoftext|>" + training, piece


@pytest.mark.parametrize("form", [f for f in FORMS if f != "stdlib"] + [pytest.param("stdlib", marks=pytest.mark.slow)])
def test_lab_trains_and_evaluates_on_the_documents_of_every_form(form, model_dir, tmp_path, offline_datasets, capsys):
    data, texts = build(form, tmp_path / "corpus")
    run, evaluated = tmp_path / "run", tmp_path / "eval"
    assert lab_train(data, run, model_dir) == 0
    if texts:
        check_trained_on(run, texts)
    if form == "text":
        return  # one document is either trained on or held out: nothing is left to evaluate on
    assert main(["lab", "eval", str(run), "--out", str(evaluated), "--factors", "1", "--documents", "1",
                 "--methods", "rope", "--quiet"]) == 0
    (row,) = records(evaluated / "lab_results.jsonl")
    assert row["status"] == "ok"
    heldout = {n: t for n, t in texts.items() if n == next(iter(texts))} if texts else {}
    check_scored([d.split("+")[0] for d in row["documents"]], row["text_starts"], heldout, 1)


def test_a_jsonl_line_without_the_field_is_refused_at_the_cli(model_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"text": TEXT * 3}, {"body": "x", "title": "y"}])
    out = tmp_path / "run"
    argv = ["eval", "--model", str(model_dir), "--lengths", "48", "--targets", "16", "--documents", "2",
            "--out", str(out), "--quiet"]
    assert main([*argv, "--data", str(corpus)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err  # one error line (after the model's loading progress)
    assert err.splitlines()[-1].startswith(
        f"ropelab eval: error: data={str(corpus)!r}: line 2 has no 'text' field (has: body, title)")
    assert not out.exists()  # refused before the run folder was made
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT * 3)
    write_jsonl(folder / "b.jsonl", [{"body": "no text here"}])
    assert main([*argv, "--data", str(folder)]) == 2
    assert f"data={str(folder / 'b.jsonl')!r}: line 1 has no 'text' field (has: body)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("data, message", [
    ("{tmp}/missing.jsonl", "no such file or folder"),
    ("{tmp}/c.jsonl:", "no such file or folder"),  # an empty field name is no field: the path does not exist
    ("hf:", "no dataset name after 'hf:'"),
])
def test_bad_data_is_refused_before_loading(data, message, tmp_path, capsys, monkeypatch):
    from ropelab.evals import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    for command in (["eval"], ["tune", "--method", "ntk", "--target-length", "48", "--targets", "16"]):
        assert main([*command, "--model", "no-such-model", "--data", data.format(tmp=tmp_path),
                     "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
