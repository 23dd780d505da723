"""Figures and reports are drawn from the result files alone."""

import contextlib
import shutil

from ropelab.evals import passkey, perplexity, plot_run, write_report
from ropelab.evals.sweep import default_methods


def test_plots_and_report_from_files_alone(model, tokenizer, text_dir, tmp_path):
    run = tmp_path / "run"
    unpatched = lambda m, method: contextlib.nullcontext(m)  # noqa: E731
    perplexity(model, tokenizer, str(text_dir), ["rope", "dynamic-ntk:scale=2"], [16, 32], protocol="position",
               short="concatenate", out=run, apply_method=unpatched, progress=False)
    passkey(model, tokenizer, ["rope"], [256], depths=(0.5,), out=run, apply_method=unpatched, progress=False)
    copy = tmp_path / "copy"  # nothing but the JSONL files
    copy.mkdir()
    for name in ("results.jsonl", "passkey.jsonl"):
        shutil.copy(run / name, copy / name)
    paths = plot_run(copy)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{ext}" for n in ("loss_vs_context", "per_position", "passkey") for ext in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
    report = write_report(copy).read_text()
    assert "| `rope` |" in report and "| `dynamic-ntk:scale=2` |" in report
    assert "Passkey retrieval" in report and "\"name\": \"position\"" in report and "torch" in report


def test_default_sweep_parameters():
    assert default_methods(8192, 16384) == [
        "rope", "linear:scale=2", "ntk:scale=2", "beta-base:scale=2", "yarn:scale=2",
        "rerope:window=4096", "leaky-rerope:window=2048,scale=16"]
    # Su's rule w + (N-1-w)/k <= L/2 raises k when N grows.
    leaky = default_methods(8192, 65536)[-1]
    assert leaky == "leaky-rerope:window=2048,scale=32"
    # The main job's time is measured by benchmarks/bench_main_job.py, not asserted from an estimate.
