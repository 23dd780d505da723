"""The lab's figures (matplotlib Agg, PNG): the training loss curve of a run folder, and
loss and accuracy versus evaluation length, one figure per training position."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(run_dir) -> Path | None:
    """run_dir/loss_curve.png from train_log.jsonl (raw loss and a moving average)."""
    run_dir = Path(run_dir)
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    tokens = np.array([r["tokens"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 25)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(tokens, loss, lw=0.6, alpha=0.4, label="loss per step")
    if len(loss) >= k:
        ax.plot(tokens[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.6, label=f"mean of {k} steps")
    run = json.loads((run_dir / "lab.json").read_text())["run"] if (run_dir / "lab.json").exists() else {}
    ax.set_title(f"lab train: {run.get('position', '?')}, size {run.get('size', '?')}, L = {run.get('train_length', '?')}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss_curve.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def length_figure(table: dict, position: str, train_length: int, out: Path) -> Path:
    """Loss (left) and accuracy (right) versus length, one line per inference method.

    table: {method: {length: {"loss": x, "accuracy": y}}} for one training position.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, cells in table.items():
        lengths = sorted(cells)
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(lengths, [cells[n][key] for n in lengths], marker="o", label=method)
    for ax, key in zip(axes, ("loss (nats)", "per-token accuracy")):
        ax.axvline(train_length, color="grey", ls="--", lw=1, label=f"training length {train_length}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"trained with {position}: mean over every position of the sequence")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
