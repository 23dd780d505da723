"""95% intervals for token-weighted losses and task accuracies, and a paired comparison.

Losses: a two-stage (hierarchical) bootstrap. Each resample draws documents with
replacement, then, inside every drawn document, blocks of contiguous target tokens with
replacement (the non-overlapping block bootstrap of Carlstein 1986, "The use of subseries
values for estimating the variance of a general statistic from a stationary sequence").
Neighbouring tokens' losses are correlated (one hard passage raises many), so resampling
single tokens would treat them as independent and give intervals that are too narrow;
whole blocks keep that correlation inside each unit. The statistic is the token-weighted
mean (sum of the drawn tokens' losses over their count), and the interval is the 2.5 and
97.5 percentiles of the resampled means.

Block size rule (`block_size`): b = max(ceil(n^(1/3)), the first lag at which the pooled
sample autocorrelation of the losses falls to 0.1 or below), capped at n // 10 so that a
document has at least 10 blocks; n is the median document length in tokens. n^(1/3) is the
order of the variance-optimal block length (Hall, Horowitz & Jing 1995, "On blocking rules
for the bootstrap with dependent data"); the autocorrelation term widens the block when the
losses stay correlated longer than that. The rule and the chosen b are returned with every
interval.

Paired comparison (`compare`): the same resampled documents and blocks for every method
(their losses are on the same tokens), so the content that makes every method's loss swing
cancels in the difference. A method is "indistinguishable from the best" at a length when
the 95% interval of its difference from the lowest-mean method contains 0 (no
multiple-comparison correction: one interval per method).

Accuracies (`accuracy_interval`): the Wilson score interval (Wilson 1927) for 0/1 scores;
a percentile bootstrap over samples for partial scores in [0, 1]. A mean over tasks
(`task_mean_interval`): a bootstrap stratified by task.

Every function is deterministic for its `seed`. Too little data for an interval (fewer
than `MIN_BLOCKS` blocks in all, or no sample) raises ValueError rather than returning one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .summary import group_of, labels  # the one place that names a run's rows

CONFIDENCE = 0.95
RESAMPLES = 2000  # percentile error of a 95% bound ~ 1/sqrt(R * 0.025) of the spread: small next to the spread
MIN_BLOCKS = 10  # below this the bootstrap distribution has too few distinct values to trust its tails
ACF_THRESHOLD = 0.1
BLOCK_RULE = "b = max(ceil(n^(1/3)), first lag with pooled autocorrelation <= 0.1), at most n // 10; n = median document length"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval, with how it was made."""

    mean: float
    low: float
    high: float
    documents: int
    blocks: int  # resampling units in all (token blocks; samples for accuracies)
    block_size: int  # tokens per block (1 for accuracies)
    how: str

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "documents": self.documents,
                "blocks": self.blocks, "block_size": self.block_size, "how": self.how}

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _as_documents(losses, field: str = "losses") -> list[np.ndarray]:
    """A list of 1-D float arrays (one per document); one array is one document."""
    if isinstance(losses, np.ndarray) and losses.ndim == 1:
        losses = [losses]
    docs = [np.asarray(d, dtype=np.float64).ravel() for d in losses]
    if not docs or any(d.size == 0 for d in docs):
        raise ValueError(f"{field}: need at least one document with at least one token (got sizes {[d.size for d in docs]})")
    if any(not np.all(np.isfinite(d)) for d in docs):
        raise ValueError(f"{field}: every loss must be finite (a NaN or inf loss has no mean)")
    return docs


def _pooled_acf(docs: list[np.ndarray], max_lag: int) -> np.ndarray:
    """Autocorrelation at lags 0..max_lag, pooled over documents (each centred on its own mean); by FFT."""
    num = np.zeros(max_lag + 1)
    var = 0.0
    for d in docs:
        x = d - d.mean()
        var += float(x @ x)
        spectrum = np.fft.rfft(x, 2 * x.size)  # zero-padded: circular correlation equals the linear one
        full = np.fft.irfft(spectrum * np.conj(spectrum))[: min(max_lag, x.size - 1) + 1]
        num[: full.size] += full
    return num / var if var > 0 else np.zeros(max_lag + 1)


def block_size(losses) -> int:
    """Tokens per block by the module's rule (`BLOCK_RULE`)."""
    docs = _as_documents(losses)
    n = int(np.median([d.size for d in docs]))
    cap = max(1, n // 10)
    floor = math.ceil(n ** (1 / 3))
    acf = _pooled_acf(docs, cap)
    below = np.nonzero(acf[1:] <= ACF_THRESHOLD)[0]
    lag = int(below[0]) + 1 if below.size else cap
    return max(1, min(cap, max(floor, lag)))


def _blocks(docs: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document, the loss sums and token counts of its blocks, padded to (D, max blocks); and blocks per document."""
    counts = np.array([math.ceil(d.size / size) for d in docs])
    sums = np.zeros((len(docs), counts.max()))
    sizes = np.zeros((len(docs), counts.max()))
    for i, d in enumerate(docs):
        edges = np.arange(0, d.size, size)
        sums[i, : edges.size] = np.add.reduceat(d, edges)  # the last block may be shorter
        sizes[i, : edges.size] = np.diff(np.append(edges, d.size))
    return sums, sizes, counts


def _draws(counts: np.ndarray, resamples: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The resampling plan, shared by every method in a paired comparison.

    One (documents (R,), block indices (R, max blocks), mask) per document slot: slot j of
    resample r draws document docs[r] and, inside it, counts[docs[r]] blocks with replacement.
    """
    plan = []
    width = counts.max()
    for _ in range(counts.size):
        chosen = rng.integers(0, counts.size, resamples)
        n = counts[chosen]
        index = np.floor(rng.random((resamples, width)) * n[:, None]).astype(np.int64)
        mask = None if np.all(counts == width) else np.arange(width)[None, :] < n[:, None]
        plan.append((chosen, index, mask))
    return plan


def _resampled_means(sums: np.ndarray, sizes: np.ndarray, plan) -> np.ndarray:
    total = np.zeros(plan[0][0].size)
    tokens = np.zeros_like(total)
    flat_sums, flat_sizes, width = sums.ravel(), sizes.ravel(), sums.shape[1]
    for chosen, index, mask in plan:
        flat = chosen[:, None] * width + index  # (R, max blocks) positions in the padded arrays
        if mask is None:  # every document has the same number of blocks
            total += np.take(flat_sums, flat).sum(axis=1)
            tokens += np.take(flat_sizes, flat).sum(axis=1)
        else:
            total += (np.take(flat_sums, flat) * mask).sum(axis=1)
            tokens += (np.take(flat_sizes, flat) * mask).sum(axis=1)
    return total / tokens


def _check(counts: np.ndarray, size: int, resamples: int) -> None:
    if counts.sum() < MIN_BLOCKS:
        raise ValueError(
            f"blocks={int(counts.sum())} (block size {size} tokens, {counts.size} document(s)): an interval needs at least "
            f"{MIN_BLOCKS} blocks of target tokens; score more tokens or documents"
        )
    if resamples < 100:
        raise ValueError(f"resamples={resamples}: must be at least 100 for 95% percentile bounds")


def _how(docs, size) -> str:
    over = "documents and blocks" if len(docs) > 1 else "blocks of one document only"
    return f"bootstrap over {over} of {size} contiguous target tokens ({BLOCK_RULE}); token-weighted mean"


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def loss_interval(losses, *, block: int | None = None, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Token-weighted mean loss and its 95% interval.

    losses: one 1-D array of per-token losses, or a list of them (one per document).
    block: tokens per block (default: `block_size`'s rule); 1 treats tokens as independent.
    """
    docs = _as_documents(losses)
    size = block_size(docs) if block is None else int(block)
    if size < 1:
        raise ValueError(f"block={block}: must be an integer >= 1 (tokens per block)")
    sums, sizes, counts = _blocks(docs, size)
    _check(counts, size, resamples)
    means = _resampled_means(sums, sizes, _draws(counts, resamples, np.random.default_rng(seed)))
    mean = float(sum(d.sum() for d in docs) / sum(d.size for d in docs))
    low, high = _percentiles(means)
    return Interval(mean, low, high, len(docs), int(counts.sum()), size, _how(docs, size))


@dataclass(frozen=True)
class Comparison:
    """One length's paired comparison: every method's interval, its difference from the best, the tie set."""

    best: str
    intervals: dict[str, Interval]
    differences: dict[str, Interval]  # method minus best; the best's own is 0
    indistinguishable: list[str]  # the best and every method whose difference interval contains 0


def compare(losses_by_method: dict[str, list], *, block: int | None = None, resamples: int = RESAMPLES,
            seed: int = 0) -> Comparison:
    """Paired bootstrap over the same documents and blocks for every method (module docstring).

    losses_by_method: {method: per-document loss arrays}, every method on the same tokens
    (same number of documents, same length per document).
    """
    if len(losses_by_method) < 1:
        raise ValueError("losses_by_method={}: give at least one method")
    docs = {m: _as_documents(v, f"losses[{m!r}]") for m, v in losses_by_method.items()}
    shapes = {m: [d.size for d in v] for m, v in docs.items()}
    first = next(iter(shapes.values()))
    for m, s in shapes.items():
        if s != first:
            raise ValueError(
                f"losses[{m!r}]: document sizes {s} differ from {first}; a paired comparison needs the same tokens for every method"
            )
    size = max(block_size(v) for v in docs.values()) if block is None else int(block)
    if size < 1:
        raise ValueError(f"block={block}: must be an integer >= 1 (tokens per block)")
    blocked = {m: _blocks(v, size) for m, v in docs.items()}
    counts = next(iter(blocked.values()))[2]
    _check(counts, size, resamples)
    plan = _draws(counts, resamples, np.random.default_rng(seed))
    resampled = {m: _resampled_means(s, z, plan) for m, (s, z, _) in blocked.items()}
    means = {m: float(sum(d.sum() for d in v) / sum(d.size for d in v)) for m, v in docs.items()}
    best = min(means, key=means.get)
    how = _how(first, size) + "; paired: the same draws for every method"
    n_docs, n_blocks = len(first), int(counts.sum())
    intervals, differences, ties = {}, {}, []
    for m in docs:
        intervals[m] = Interval(means[m], *_percentiles(resampled[m]), n_docs, n_blocks, size, how)
        low, high = _percentiles(resampled[m] - resampled[best])
        differences[m] = Interval(means[m] - means[best], low, high, n_docs, n_blocks, size, how)
        if m == best or low <= 0.0:
            ties.append(m)
    return Comparison(best, intervals, differences, ties)


def wilson(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for `correct` successes in `total` trials."""
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"correct={correct}, total={total}: need total >= 1 and 0 <= correct <= total")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(scores, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean score and its 95% interval: Wilson for 0/1 scores, a bootstrap over samples otherwise."""
    x = np.asarray(list(scores), dtype=np.float64)
    if x.size == 0:
        raise ValueError("scores=[]: an accuracy interval needs at least one scored sample")
    if np.any((x < 0) | (x > 1)) or not np.all(np.isfinite(x)):
        raise ValueError(f"scores: every score must be in [0, 1] (got min {x.min()}, max {x.max()})")
    mean = float(x.mean())
    if np.all((x == 0) | (x == 1)):
        low, high = wilson(int(x.sum()), x.size)
        return Interval(mean, low, high, x.size, x.size, 1, "Wilson score interval over samples")
    if x.size < MIN_BLOCKS:
        raise ValueError(f"samples={x.size}: a bootstrap interval for partial scores needs at least {MIN_BLOCKS} samples")
    draws = np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))
    low, high = _percentiles(x[draws].mean(axis=1))
    return Interval(mean, low, high, x.size, x.size, 1, "percentile bootstrap over samples")


def task_mean_interval(scores_by_task: dict[str, list], *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean over tasks of each task's mean score, with a 95% interval.

    One task: `accuracy_interval`. Several: a stratified percentile bootstrap (each resample
    draws every task's samples with replacement inside that task, so each task keeps its
    weight), which needs at least `MIN_BLOCKS` samples in all.
    """
    tasks = {t: np.asarray(list(v), dtype=np.float64) for t, v in scores_by_task.items()}
    if not tasks or any(x.size == 0 for x in tasks.values()):
        raise ValueError(f"scores_by_task: need at least one task, each with a scored sample (got {sorted(tasks)})")
    if len(tasks) == 1:
        return accuracy_interval(next(iter(tasks.values())), resamples=resamples, seed=seed)
    total = sum(x.size for x in tasks.values())
    if total < MIN_BLOCKS:
        raise ValueError(f"samples={total}: a stratified bootstrap over tasks needs at least {MIN_BLOCKS} samples")
    rng = np.random.default_rng(seed)
    means = np.mean([x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1) for x in tasks.values()], axis=0)
    low, high = _percentiles(means)
    mean = float(np.mean([x.mean() for x in tasks.values()]))
    return Interval(mean, low, high, total, total, 1, f"stratified percentile bootstrap over samples of {len(tasks)} tasks")


def fixed_target_losses(records: list[dict]) -> dict[tuple[str, int], list[np.ndarray]]:
    """Adapter from perplexity records: {(row label, length): [per-document target losses]}.

    Each successful fixed-target record's last `params["targets"]` losses, rows labelled as
    in evals/summary.py (records made with different parameters never share a row),
    documents in a fixed order (sorted by id) so that every row's list pairs up.
    """
    names = labels(records)
    out: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for r in records:
        params = r.get("params", {})
        if r.get("status") == "ok" and params.get("protocol") == "fixed-target":
            targets = params["targets"]
            out.setdefault((names[group_of(r)], r["length"]), {})[r["document"]] = np.asarray(r["losses"][-targets:],
                                                                                             dtype=np.float64)
    return {k: [v[d] for d in sorted(v)] for k, v in out.items()}
