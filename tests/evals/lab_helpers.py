"""Helpers for the lab tests: a small text corpus, micro run settings, file snapshots."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from ropelab.evals.lab import TrainConfig

WORDS = ("def return class self value index list dict name item data result error none true false "
         "import from for while if else elif try except with open read write print len range").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """60 small documents of Python-like text (seeded), so 1 in 4 held out leaves ~45 for training."""
    folder = tmp_path_factory.mktemp("lab-corpus")
    rng = random.Random(0)
    for d in range(60):
        lines = []
        for _ in range(rng.randint(20, 40)):
            words = rng.sample(WORDS, rng.randint(3, 7))
            lines.append("    " * rng.randint(0, 2) + " ".join(words) + ("():" if rng.random() < 0.3 else ""))
        (folder / f"doc{d:02d}.py").write_text("\n".join(lines) + "\n")
    return folder


def micro_config(position: str, corpus, tokens: int = 4 * 16 * 4, **overrides) -> TrainConfig:
    """A micro run: size micro, L = 16, batch 4, lr 1e-2 (large: a few steps must show learning)."""
    settings = dict(position=position, size="micro", train_length=16, batch_size=4, tokens=tokens, lr=1e-2,
                    warmup=0.0, data=str(corpus), heldout_every=4, tokenizer="micro-bpe")
    return TrainConfig(**{**settings, **overrides})


def read_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def snapshot(folder, skip=()) -> dict:
    """relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}
