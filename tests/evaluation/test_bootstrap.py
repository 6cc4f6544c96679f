"""Viewer-clustered bootstrap: resample viewers, fall back to rows (and say so)."""

import numpy as np
import pytest

from grailcore.evaluation.bootstrap import cluster_ids, make_plan, mean_estimate, statistic_estimate


def dominated_dataset():
    """One viewer with 40 correct rows, 40 other viewers with one wrong row each."""
    values = np.array([1.0] * 40 + [0.0] * 40)
    viewers = ["heavy"] * 40 + [f"v{i}" for i in range(40)]
    return values, viewers


def width(est):
    return est.hi - est.lo


def test_a_dominant_viewer_widens_the_interval_beyond_row_resampling():
    values, viewers = dominated_dataset()
    clustered = mean_estimate(values, make_plan(viewers, n_boot=2000, seed=1))
    rows = mean_estimate(values, make_plan([None] * len(values), n_boot=2000, seed=1))
    assert clustered.value == rows.value == pytest.approx(0.5)
    # Rows: binomial-like, about +-0.11. Viewers: the heavy viewer is in or out -> about 0 .. 0.7.
    assert width(rows) < 0.3
    assert width(clustered) > 2 * width(rows)
    assert clustered.lo <= 0.5 <= clustered.hi


def test_distinct_viewers_equal_row_resampling():
    values = np.arange(30) % 2.0
    by_viewer = mean_estimate(values, make_plan([f"v{i}" for i in range(30)], n_boot=500, seed=3))
    by_row = mean_estimate(values, make_plan([None] * 30, n_boot=500, seed=3))
    assert (by_viewer.lo, by_viewer.hi) == (by_row.lo, by_row.hi)


def test_fallback_to_rows_is_reported():
    plan = make_plan([None, None, None], n_boot=10)
    assert plan.unit == "row" and "no viewer_id" in plan.note
    partial = make_plan(["a", None, "a"], n_boot=10)
    assert partial.unit == "viewer" and "1 rows without viewer_id" in partial.note
    ids, _, _ = cluster_ids(["a", None, "a", "b", None])
    assert ids.tolist() == [0, 1, 0, 2, 3]  # missing ids never merge with each other
    assert make_plan(["a"], n_boot=0) is None


def test_replicates_keep_viewers_whole():
    plan = make_plan(["a", "a", "b", "c", "c", "c"], n_boot=200, seed=0)
    w = plan.row_weights
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 2, 3]].sum(axis=1) == 3).all()  # 3 viewers drawn per replicate


def test_subgroup_mask_and_generic_statistic():
    values = np.array([1.0, 0.0, 1.0, 1.0])
    plan = make_plan(["a", "b", "c", "d"], n_boot=300, seed=0)
    sub = mean_estimate(values, plan, mask=np.array([True, True, False, False]))
    assert sub.value == pytest.approx(0.5) and 0.0 <= sub.lo <= sub.hi <= 1.0
    assert np.isnan(mean_estimate(values, plan, mask=np.zeros(4, bool)).value)
    est = statistic_estimate(lambda w: float((w * values).sum() / w.sum()), 4, plan)
    full = mean_estimate(values, plan)
    assert est.value == full.value and est.lo == pytest.approx(full.lo) and est.hi == pytest.approx(full.hi)
    no_ci = mean_estimate(values, None)
    assert no_ci.value == 0.75 and np.isnan(no_ci.lo)
