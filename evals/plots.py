"""Figures drawn from a run directory's result files alone (matplotlib Agg; PNG and SVG).

- `loss_vs_context`: the score per context length, one line per method, the training
  length marked (the headline curve under the fixed-target protocol);
- `per_position`: the loss at every position of each method's longest forward, averaged
  over documents and smoothed by a moving average;
- `passkey`: accuracy heatmaps, depth × length, one panel per method.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import protocols, summary  # noqa: E402
from .passkey import accuracy  # noqa: E402


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _mark_train_length(ax, protocol: dict) -> None:
    if protocol.get("train_length"):
        ax.axvline(protocol["train_length"], color="grey", ls="--", lw=1, label=f"training length {protocol['train_length']}")


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def loss_vs_context(run_dir, out=None) -> list[Path]:
    protocol, records = summary.load(run_dir)
    if protocol is None:
        return []
    rows = summary.table(protocol, records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, row in rows.items():
        if row:
            xs = sorted(row)
            ax.plot(xs, [row[x] for x in xs], marker="o", label=method)
    _mark_train_length(ax, protocol)
    lengths = summary.lengths_in(records)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.set_xlabel("context length N (tokens)")
    ax.set_ylabel(f"{protocols.get(protocol['name']).axis_label(protocol)} (nats)")
    ax.set_title(f"{protocol['model']}: loss versus context ({protocol['name']} protocol, {protocol['data']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out or run_dir), "loss_vs_context")


def per_position(run_dir, out=None, smooth: int | None = None) -> list[Path]:
    protocol, records = summary.load(run_dir)
    curves = summary.position_curves(records) if protocol else {}
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, curve in curves.items():
        k = smooth or max(1, len(curve) // 64)
        smoothed = np.convolve(curve, np.ones(k) / k, mode="valid")  # moving average over k positions
        ax.plot(np.arange(len(smoothed)) + k, smoothed, lw=1.2, label=method)
    _mark_train_length(ax, protocol)
    ax.set_xlabel("context length (tokens before the predicted token)")
    ax.set_ylabel("loss (nats), moving average")
    ax.set_title(f"{protocol['model']}: per-position loss (each method's longest forward)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out or run_dir), "per_position")


def passkey(run_dir, out=None) -> list[Path]:
    protocol, records = summary.load(run_dir, "passkey.jsonl")
    acc = accuracy(records)
    if not acc:
        return []
    fig, axes = plt.subplots(1, len(acc), figsize=(3.2 * len(acc) + 1, 3.4), squeeze=False)
    for ax, (method, cells) in zip(axes[0], acc.items()):
        lengths = sorted({n for n, _ in cells})
        depths = sorted({d for _, d in cells})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), value in cells.items():
            grid[depths.index(d), lengths.index(n)] = value
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length")
        ax.set_title(method, fontsize=9)
    axes[0][0].set_ylabel("depth of the key")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{protocol['model']}: passkey retrieval (greedy)")
    return _save(fig, Path(out or run_dir), "passkey")


def plot_run(run_dir, out=None) -> list[Path]:
    """Every figure the run directory's files allow; returns the paths written."""
    return loss_vs_context(run_dir, out) + per_position(run_dir, out) + passkey(run_dir, out)
