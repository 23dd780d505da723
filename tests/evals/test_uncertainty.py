"""Intervals: coverage on synthetic data with a known mean, block versus iid width on
correlated tokens, the paired comparison's power and its silence on equal methods, edges."""

import math

import numpy as np
import pytest

from ropelab.evals.uncertainty import (
    MIN_BLOCKS, accuracy_interval, block_size, compare, fixed_target_losses, loss_interval, wilson,
)


def ar1(rng, n, rho, mean=2.0, sd=1.0):
    """AR(1) series with marginal sd `sd`: x_t = rho x_{t-1} + e_t."""
    e = rng.normal(0, sd * math.sqrt(1 - rho * rho), n)
    x = np.empty(n)
    x[0] = rng.normal(0, sd)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return mean + x


def test_coverage_of_iid_tokens_near_95_percent():
    rng = np.random.default_rng(1)
    reps, hits = 200, 0
    for r in range(reps):
        docs = [rng.normal(2.0, 1.0, 400) for _ in range(4)]
        iv = loss_interval(docs, resamples=400, seed=r)
        hits += iv.low <= 2.0 <= iv.high
    # 200 Bernoulli(0.95) trials: sd 0.015; 0.89..0.99 is 4 sd either side (percentile intervals run a bit short)
    assert 0.89 <= hits / reps <= 0.99


def test_block_bootstrap_is_wider_than_iid_on_correlated_tokens_and_covers():
    rng = np.random.default_rng(2)
    rho = 0.9  # integrated autocorrelation time (1+rho)/(1-rho) = 19: the iid variance is 19x too small
    reps, block_hits, iid_hits, ratios = 100, 0, 0, []
    for r in range(reps):
        docs = [ar1(rng, 2000, rho)]
        blocked = loss_interval(docs, resamples=400, seed=r)
        iid = loss_interval(docs, block=1, resamples=400, seed=r)
        ratios.append((blocked.high - blocked.low) / (iid.high - iid.low))
        block_hits += blocked.low <= 2.0 <= blocked.high
        iid_hits += iid.low <= 2.0 <= iid.high
    assert block_size(docs) >= 22  # the ACF of AR(1) falls to 0.1 at lag log(0.1)/log(0.9) = 21.9
    assert np.median(ratios) > 3.0  # sqrt(19) = 4.4 in the limit of long blocks
    assert iid_hits / reps < 0.6  # treating correlated tokens as independent: badly short intervals
    assert block_hits / reps > 0.8  # blocks of ~22 capture most, not all, of the correlation


def test_block_rule_on_iid_tokens_is_the_cube_root():
    rng = np.random.default_rng(3)
    assert block_size([rng.normal(size=2048)]) == math.ceil(2048 ** (1 / 3))  # 13: ACF is ~0 at lag 1


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    docs = [rng.normal(size=500) for _ in range(3)]
    assert loss_interval(docs, seed=7) == loss_interval(docs, seed=7)
    assert loss_interval(docs, seed=7) != loss_interval(docs, seed=8)


def test_token_weighted_mean_not_mean_of_document_means():
    docs = [np.full(100, 1.0), np.full(300, 3.0)]
    assert loss_interval(docs).mean == pytest.approx(2.5, abs=1e-12)  # (100 + 900) / 400


def test_paired_comparison_detects_a_shift_and_ties_equal_methods():
    rng = np.random.default_rng(5)
    content = [ar1(rng, 2000, 0.5, sd=1.0) for _ in range(3)]  # shared content swings, much larger than the shift
    methods = {
        "a": [c + rng.normal(0, 0.1, c.size) for c in content],
        "a-twin": [c + rng.normal(0, 0.1, c.size) for c in content],  # same true mean as a
        "worse": [c + 0.03 + rng.normal(0, 0.1, c.size) for c in content],
    }
    result = compare(methods, seed=0)
    assert result.best in {"a", "a-twin"}
    assert set(result.indistinguishable) == {"a", "a-twin"}
    assert result.differences["worse"].low > 0
    # unpaired intervals overlap: the shift (0.03) is far inside each method's own interval width
    assert result.intervals["worse"].low < result.intervals["a"].high
    assert result.differences[result.best].mean == 0.0


def test_paired_comparison_refuses_different_tokens():
    with pytest.raises(ValueError, match=r"losses\['b'\].*same tokens"):
        compare({"a": [np.zeros(100)], "b": [np.zeros(99)]})


def test_too_little_data_is_refused_not_given_a_fake_interval():
    with pytest.raises(ValueError, match=r"blocks=1 .*at least 10 blocks"):
        loss_interval([np.ones(5)], block=5)
    with pytest.raises(ValueError, match="blocks=.*1 document"):
        loss_interval([np.ones(MIN_BLOCKS - 1)], block=1)
    with pytest.raises(ValueError, match="finite"):
        loss_interval([np.array([1.0, float("nan")] * 20)])
    with pytest.raises(ValueError, match="at least one document"):
        loss_interval([])
    with pytest.raises(ValueError, match="block=0"):
        loss_interval([np.ones(100)], block=0)


def test_one_document_says_it_covers_one_document_only():
    iv = loss_interval([np.random.default_rng(6).normal(size=1000)])
    assert "one document only" in iv.how and iv.documents == 1 and iv.blocks >= MIN_BLOCKS


def test_wilson_against_closed_form():
    # 8/10 at z = 1.959964: the textbook values 0.4902, 0.9433
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.49016, abs=5e-5) and high == pytest.approx(0.94331, abs=5e-5)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="total=0"):
        wilson(0, 0)


def test_accuracy_interval_binary_and_partial():
    binary = accuracy_interval([1, 1, 0, 1])
    assert binary.mean == 0.75 and binary.how.startswith("Wilson")
    partial = accuracy_interval([0.5, 1.0, 0.0, 0.25] * 5, seed=1)
    assert partial.low < partial.mean < partial.high and "bootstrap" in partial.how
    with pytest.raises(ValueError, match=r"scores=\[\]"):
        accuracy_interval([])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        accuracy_interval([1.5])


def test_adapter_from_fixed_target_records_pairs_documents():
    recs = [
        {"status": "ok", "params": {"protocol": "fixed-target", "targets": 4}, "model_key": "k", "method": m,
         "length": 64, "document": d, "losses": list(range(10))}
        for m in ("rope", "ntk") for d in ("b", "a")
    ] + [{"status": "error", "params": {"protocol": "fixed-target", "targets": 4}, "model_key": "k", "method": "yarn",
          "length": 64, "document": "a"}]
    out = fixed_target_losses(recs)
    assert set(out) == {("rope", 64), ("ntk", 64)}
    assert [list(x) for x in out[("rope", 64)]] == [[6, 7, 8, 9]] * 2


def test_task_mean_interval_weights_tasks_equally_and_resamples_inside_each():
    from ropelab.evals.uncertainty import accuracy_interval, task_mean_interval

    one = [1, 0, 1, 1]
    assert task_mean_interval({"a": one}) == accuracy_interval(one)  # one task: Wilson, as the task table
    # a task of 10 ones and one of 2 zeros: equal weights give 0.5 whatever the sizes, and every
    # resample is 0.5 too (each task's draws stay inside that task): a point interval
    iv = task_mean_interval({"a": [1] * 10, "b": [0, 0]})
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    mixed = {"a": rng.integers(0, 2, 12).tolist(), "b": rng.random(12).tolist()}
    iv = task_mean_interval(mixed, seed=1)
    assert iv.mean == pytest.approx((np.mean(mixed["a"]) + np.mean(mixed["b"])) / 2, rel=1e-12)
    assert 0 <= iv.low < iv.mean < iv.high <= 1 and iv.documents == 24
    with pytest.raises(ValueError, match="samples=4"):
        task_mean_interval({"a": [1, 0], "b": [1, 1]})
    with pytest.raises(ValueError, match="scores_by_task"):
        task_mean_interval({"a": []})
