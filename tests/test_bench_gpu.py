"""benchmarks/bench_gpu.py's plumbing on the CPU (--smoke: tiny shapes, numbers meaningless):
every requested case is in the JSON and the table, measured or skipped with a reason; a
spent budget skips cases instead of running them; bad flags exit 2 before anything runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
METHODS = "rerope:window=64;dca:chunk_size=96,local_window=16"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, tmp_path, capsys, *extra):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--lengths", "256", "--smoke", "--rounds", "1", "--decode-steps", "2",
            "--methods", METHODS, "--model-methods", "rerope:window=64", "--out", str(out), *extra]
    assert bench.main(argv) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_smoke_every_case_present(bench, tmp_path, capsys):
    import torch
    import transformers

    result, table = run(bench, tmp_path, capsys)
    assert result["device_name"] == "cpu"
    assert result["torch"] == torch.__version__ and result["transformers"] == transformers.__version__
    assert f"torch {torch.__version__}; transformers {transformers.__version__}" in table
    ops = {(r["length"], r["case"], r["backend"]): r for r in result["op"]}
    expected = {(256, "sdpa", "sdpa"), (256, "rope+sdpa", "sdpa")} | {(256, m, b) for m in METHODS.split(";") for b in ("cpu", "flex")}
    assert set(ops) == expected  # no flash_attn here: no flash_attn_func row
    for row in ops.values():
        assert row["status"] == "ok", row
        assert len(row["seconds"]) == 1 and row["seconds"][0] > 0
        # bf16 against the float64 reference: nonzero (bf16 rounds) and far below the O(1)
        # outputs (a wrong reference rotation or window would differ by O(0.1-1)); observed ≈ 4e-3-8e-3
        assert 0 < row["error_max"] < 0.05, row
        assert f"| 256 | {row['case']} | {row['backend']} |" in table
    assert ops[(256, "sdpa", "sdpa")]["error_ratio_sdpa"] == 1.0
    models = {(r["model"], r["attn"], r["case"]): r for r in result["model"]}
    assert set(models) == {(m, "sdpa", c) for m in ("smollm2-135m", "llama3-8b-shapes")
                           for c in ("unpatched", "rerope:window=64")}
    for row in models.values():
        assert row["status"] == "ok", row
        assert row["prefill_s"][0] > 0 and row["decode_s"][0] > 0
        # the cache holds the 256 prefilled + 2 decoded tokens: 2 layers × (K + V) × 1 head × 32 dims × bf16
        assert row["kv_bytes"] == 2 * 2 * 1 * (256 + 2) * 32 * 2
        assert f"| {row['model']} | sdpa | 256 | {row['case']} |" in table
    for name in ("smollm2-135m", "llama3-8b-shapes"):
        plain, patched = models[(name, "sdpa", "unpatched")], models[(name, "sdpa", "rerope:window=64")]
        assert plain["key_form_bytes"] == 0 and plain["cache_ratio"] == 1.0
        assert patched["cache_ratio"] == (patched["kv_bytes"] + patched["key_form_bytes"]) / plain["kv_bytes"]


def test_spent_budget_skips_with_reason(bench, tmp_path, capsys):
    result, table = run(bench, tmp_path, capsys, "--budget-s", "0")
    rows = result["op"] + result["model"]
    assert len(rows) == 2 + 2 * 2 + 2 * 2  # sdpa, rope+sdpa, 2 methods × 2 backends; 2 models × 2 cases
    for row in rows:
        assert row["status"] == "skipped" and "budget" in row["reason"], row
    assert table.count("skipped: budget") == len(rows)


def test_failing_case_is_skipped_not_fatal(bench, tmp_path, capsys, monkeypatch):
    """A backend that raises (say, a kernel that does not compile) costs its rows, not the run."""
    import ropelab.attention

    real = ropelab.attention.rotary_attention

    def flaky(*args, backend="auto", **kw):
        if backend == "flex":
            raise RuntimeError("no kernel for you")
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(ropelab.attention, "rotary_attention", flaky)
    result, table = run(bench, tmp_path, capsys, "--levels", "op")
    for row in result["op"]:
        if row["backend"] == "flex":
            assert row["status"] == "skipped" and row["reason"] == "failed: RuntimeError: no kernel for you"
        else:
            assert row["status"] == "ok" and row["error_max"] > 0, row
    assert result["model"] == [] and result["complete"]


@pytest.mark.parametrize("flag", [["--lengths", "0"], ["--key-cache", "kept,fat"], ["--rounds", "0"],
                                  ["--levels", "op,kernel"], ["--budget-s", "-1"]])
def test_bad_flags_exit_2(bench, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--smoke", "--out", str(tmp_path / "x.json"), *flag])
    assert exc.value.code == 2
    assert not (tmp_path / "x.json").exists()
