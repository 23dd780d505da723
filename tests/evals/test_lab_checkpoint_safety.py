"""`ropelab lab train` resumes only checkpoints of plain values: a crafted file (a pickle that
would run code when unpickled) in a run folder is refused with exit 2 naming it, the code does
not run, and the folder is left as it was; the genuine file then resumes."""

from __future__ import annotations

import builtins
import shutil

import pytest
import torch
from lab_helpers import corpus, snapshot  # noqa: F401  (corpus: a fixture)

from ropelab.evals.cli import main


class RunsCode:
    """Unpickling this calls exec on `code`: what a malicious checkpoint would carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return builtins.exec, (self.code,)


def train_argv(corpus, model_dir, out) -> list[str]:
    return ["lab", "train", "--position", "rope", "--size", "micro", "--train-length", "16", "--batch-size", "2",
            "--tokens", str(16 * 2 * 4), "--heldout-every", "4", "--tokenizer", str(model_dir), "--data", str(corpus),
            "--save-every", "1", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def stopped_run(corpus, model_dir, tmp_path_factory):
    """A run folder stopped at step 2 of 4, with its checkpoint: each test resumes a copy."""
    run = tmp_path_factory.mktemp("lab") / "run"
    assert main([*train_argv(corpus, model_dir, run), "--stop-after", "2"]) == 0
    return run


@pytest.mark.parametrize("file", ["checkpoint/state.pt", "checkpoint/optimizer.pt", "checkpoint/scheduler.pt",
                                  "tokens.pt"])
def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(file, stopped_run, corpus, model_dir, tmp_path,
                                                                 capsys):
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(stopped_run, run)
    argv = train_argv(corpus, model_dir, run)
    genuine = tmp_path / "genuine.pt"
    shutil.copy(run / file, genuine)
    torch.save({"step": RunsCode(f"open({str(marker)!r}, 'w').write('ran')")}, run / file)
    before = snapshot(run)
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ropelab lab: error: checkpoint={str(run / file)!r}: refused: loading it would "
                          "run Python code (it names exec)"), err
    assert not marker.exists()  # the code did not run
    assert snapshot(run) == before  # nothing of the run changed

    torch.load(run / file, weights_only=False)  # what the old loader did: the file really runs its code
    assert marker.read_text() == "ran"
    shutil.copy(genuine, run / file)
    assert main(argv) == 0  # the genuine checkpoint resumes to the end
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 4
