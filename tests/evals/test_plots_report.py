"""Figures and reports are drawn from the result files alone."""

import contextlib
import shutil

import matplotlib.collections as mcoll

from ropelab.evals import passkey, perplexity, plot_run, write_report
from ropelab.evals import summary
from ropelab.evals.plots import curves_from_records, run_figures
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
    figures = run_figures(copy)
    (loss,) = figures["loss_vs_context"].axes  # nothing explodes on 32 tokens: one panel
    assert loss.get_ylabel() == "mean loss over the first N tokens (nats)"  # the position protocol's own axis label
    labels = [line.get_label() for line in loss.get_lines()]
    assert labels == ["rope", "dynamic-ntk:scale=2", "training length 64"]
    # rope is prefix-consistent: its curve has a point per prefix length from 16 to 32 (from one forward);
    # dynamic-ntk is length-dependent: only the two lengths it was run at
    assert len(loss.get_lines()[0].get_xdata()) > 2 and list(loss.get_lines()[1].get_xdata()) == [16, 32]
    bands = [c for c in loss.collections if isinstance(c, mcoll.PolyCollection)]
    assert len(bands) == 2  # one band per method, each with a nonzero height
    protocol, records = summary.load(copy)
    curves = curves_from_records(protocol, records)
    assert all(low < mean < high for row in curves.values() for mean, low, high in row.values())
    (position,) = figures["per_position"].axes
    assert [line.get_label() for line in position.get_lines()] == ["reference: rope", "dynamic-ntk:scale=2", "training length 64"]
    heat = figures["passkey"].axes[0]
    assert heat.get_title() == "rope" and heat.get_images()[0].get_array().shape == (1, 1)
    report = write_report(copy).read_text()
    assert "| `rope` |" in report and "| `dynamic-ntk:scale=2` |" in report
    assert "Passkey retrieval" in report and "\"name\": \"position\"" in report and "torch" in report


def test_default_sweep_parameters_and_budget():
    assert default_methods(8192, 16384) == [
        "rope", "linear:scale=2", "ntk:scale=2", "beta-base:scale=2", "yarn:scale=2",
        "rerope:window=4096", "leaky-rerope:window=2048,scale=16"]
    # Su's rule w + (N-1-w)/k <= L/2 raises k when N grows.
    leaky = default_methods(8192, 65536)[-1]
    assert leaky == "leaky-rerope:window=2048,scale=32"
    # The main job's time is measured by benchmarks/bench_main_job.py, not asserted from an estimate.
