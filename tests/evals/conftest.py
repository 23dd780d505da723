"""Fixtures for the evals tests (helpers in evals_helpers.py, importable beside the tests)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from evals_helpers import COMMIT, OTHER, TEXT, make_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_llama(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_dir(tmp_path):
    """A folder of three small text documents."""
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text((TEXT + f" Document {i}. ") * (3 + i))
    return d


@pytest.fixture
def hub(tmp_path, monkeypatch, model_dir):
    """A hub cache in huggingface_hub's layout holding org/tiny (the tiny model) at main = COMMIT
    and tag v1 = OTHER (the same weights under another commit); offline, so nothing is fetched."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit in (COMMIT, OTHER):
        shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OTHER)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache
