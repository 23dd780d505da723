"""`lab train` under torchrun with 2 CPU processes (gloo, data-parallel through accelerate)
follows the single-process run: each process takes half of every batch, gradients are
averaged, so the loss sequence is the same up to float32 summation order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lab_helpers import corpus, read_losses  # noqa: F401  (corpus: a fixture)


@pytest.mark.slow  # ~45 s here: three interpreters start (two under torchrun)
def test_two_gloo_processes_follow_one(corpus, tmp_path):  # noqa: F811
    args = ["--position", "rope", "--size", "micro", "--train-length", "16", "--batch-size", "4", "--tokens", "512",
            "--lr", "0.01", "--data", str(corpus), "--heldout-every", "4", "--tokenizer", "corpus:300", "--quiet",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "ropelab.evals.lab", "train", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "ropelab.evals.lab", "train", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    # the mean of two half-batch means and the all-reduced gradients round differently in
    # float32 (~1e-7 relative per step); over 8 steps that stays well below 1e-5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert a[-1] < a[0] - 0.5
    summary = json.loads((tmp_path / "two" / "lab.json").read_text())["summary"]
    assert summary["steps"] == 8
