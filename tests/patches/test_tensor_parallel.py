"""A patched model under transformers' tensor parallelism (tp_plan="auto"), 2 gloo ranks on
CPU started by torchrun: ropelab's attention sees each rank's local heads, and the logits are
the single-process patched model's within float32 rounding."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build, logits, tokens

from ropelab.patches import patch

# Tensor parallelism splits o_proj's and down_proj's contractions into 2 partial sums that
# gloo all-reduces: another summation order in 2 layers. The unpatched model measured 4.9
# float32 ulp of the largest logit from the single process; bound 16.
ULPS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes, each importing transformers: ~20 s of CPU
def test_patched_model_under_tensor_parallelism(tmp_path):
    model = build("llama")  # 4 query heads over 2 key/value heads: 2 and 1 per rank
    model.save_pretrained(tmp_path / "model")
    ids = tokens(48)
    expected = {"unpatched": logits(model, ids)}
    for spec in ("ntk:scale=2", "rerope:window=8"):
        with patch(model, spec):
            expected[spec] = logits(model, ids)
    worker = Path(__file__).with_name("tp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker),
                          str(tmp_path / "model"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["q_proj_local"] == [32, 32]  # column-wise half of q_proj's (4 heads x 16, 32)
        assert got["rerope:window=8 heads"] == [2]  # the local half of the 4 query heads
        for key in ("unpatched", "ntk:scale=2", "rerope:window=8"):
            bound = ULPS * torch.finfo(torch.float32).eps * expected[key].abs().max().item()
            torch.testing.assert_close(torch.tensor(got[key]), expected[key], atol=bound, rtol=0)
        assert torch.equal(torch.tensor(got["undone"]), torch.tensor(got["unpatched"]))
