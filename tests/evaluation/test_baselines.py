"""Every baseline on a hand-made dataset whose answers are worked out by hand."""

import numpy as np
import pytest

from grailcore.evaluation import baselines as bl
from grailcore.evaluation.evaluate import EvalOptions, evaluate_rows
from grailcore.evaluation.rows import NONE, build_rows

from .helpers import example

VIEWS = (
    ("A (x, 10s long) — Engagement: views 1,200, likes 3", "B — Engagement: views 50,000, likes 1"),
    ("A — Engagement: views 7", "B — Engagement: views 9", "C — Engagement: views 9"),  # tie -> first max
    ("A — no engagement shown", "B", "C", "D"),  # no views at all
    ("A — views 3", "B — views 1", "C — views 2,000,000", "D"),  # D has no views
)
# gold positions 2, 1, 4, 3 on slates of 2, 3, 4, 4 options
EVAL = [example(i, g, n, option_texts=VIEWS[i]) for i, (g, n) in enumerate([(2, 2), (1, 3), (4, 4), (3, 4)])]
TRAIN = [example(10 + i, g, n) for i, (g, n) in enumerate([(3, 4), (3, 4), (1, 3), (2, 2)])]


def rows_of(examples, answers=None):
    return build_rows(examples, answers or [[1]] * len(examples))


def test_fixed_position_and_random_baselines():
    rows = rows_of(EVAL)
    out = bl.choice_baselines(rows, EVAL, bl.prior_source(rows, TRAIN, alpha=1.0))
    assert out["random"].scores.mean() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 4) / 4)
    assert out["always_first"].scores.tolist() == [0, 1, 0, 0]
    assert out["always_last"].scores.tolist() == [1, 0, 1, 0]


def test_most_frequent_position_fitted_on_train_is_clipped_to_the_slate():
    rows = rows_of(EVAL)
    prior = bl.prior_source(rows, TRAIN, alpha=1.0)
    assert prior.mode == 3 and "train (4 rows)" in prior.fitted_on
    out = bl.choice_baselines(rows, EVAL, prior)
    # position 3 -> clipped to 2 on the 2-option slate (gold 2: hit), 3 elsewhere (gold 1, 4, 3)
    assert out["most_frequent_position"].scores.tolist() == [1, 0, 0, 1]
    # per size from train: size 2 -> 2, size 3 -> 1, size 4 -> 3
    assert out["most_frequent_position_by_size"].scores.tolist() == [1, 1, 0, 1]


def test_most_frequent_position_without_train_is_fitted_on_eval_and_says_so():
    rows = rows_of(EVAL)
    prior = bl.prior_source(rows, None, alpha=1.0)
    assert prior.mode == 1  # gold 2, 1, 4, 3: all tied, the lowest wins
    assert "evaluated rows" in prior.fitted_on and "optimistic" in prior.fitted_on
    assert "evaluated rows" in bl.choice_baselines(rows, EVAL, prior)["most_frequent_position"].description


def test_position_prior_smoothing_and_unseen_size():
    prior = bl.fit_position_prior([1, 1, 2], [2, 2, 2], alpha=1.0, fitted_on="x")
    np.testing.assert_allclose(prior.probs(2), [3 / 5, 2 / 5])
    unseen = prior.probs(3)  # falls back to the overall histogram cut to 3 positions
    assert unseen.shape == (3,) and unseen.sum() == pytest.approx(1.0) and unseen[2] < 1e-9


def test_views_parsing_and_most_viewed():
    assert bl.parse_views("Title — Engagement: views 2,433,982, likes 18,834") == 2433982
    assert bl.parse_views("no counts here") is None
    assert bl.most_viewed_choice(EVAL).tolist() == [2, 2, NONE, 3]
    rows = rows_of(EVAL)
    out = bl.choice_baselines(rows, EVAL, bl.prior_source(rows, None, 1.0))
    assert out["most_viewed"].scores.tolist() == [1, 0, 0, 1]
    assert "75%" in out["most_viewed"].description  # 3 of 4 rows carry views


def test_synthetic_ceiling_and_true_sampling():
    examples = [example(0, 1, 2, true_probs=(0.7, 0.3)), example(1, 2, 3, true_probs=(0.2, 0.2, 0.6))]
    rows = rows_of(examples)
    out = bl.choice_baselines(rows, examples, bl.prior_source(rows, None, 1.0))
    assert out["bayes_optimal"].scores.tolist() == pytest.approx([0.7, 0.6])
    assert out["true_sampling"].scores.tolist() == pytest.approx([0.49 + 0.09, 0.04 + 0.04 + 0.36])
    assert "bayes_optimal" not in bl.choice_baselines(rows_of(EVAL), EVAL, bl.prior_source(rows, None, 1.0))


def test_majority_opinion_prefers_train_rows():
    evals = [example(i, 1, 2, opinion=o) for i, o in enumerate(["increase", "increase", "no_change", None])]
    train = [example(9, 1, 2, opinion="no_change")]
    rows = rows_of(evals)
    from_train = bl.opinion_baselines(rows, train)["majority_opinion"]
    assert from_train.scores[from_train.rows_mask].tolist() == [0, 0, 1]
    assert "no_change" in from_train.description and "train" in from_train.description
    from_eval = bl.opinion_baselines(rows, None)["majority_opinion"]
    assert from_eval.scores[from_eval.rows_mask].tolist() == [1, 1, 0]
    assert "optimistic" in from_eval.description
    assert bl.opinion_baselines(rows_of(EVAL), None) == {}  # no gold direction at all


def test_evaluate_scores_baselines_on_the_same_rows_with_paired_differences():
    rows = rows_of(EVAL, [[2], [1], [NONE], [1]])  # model: right, right, unparsed, wrong
    res = evaluate_rows(rows, EVAL, TRAIN, EvalOptions(n_boot=0))
    assert res["choice"]["accuracy"].value == pytest.approx(0.5)
    table = res["baselines"]
    assert table["always_first"]["accuracy"].value == pytest.approx(0.25)
    assert table["always_first"]["model_minus_baseline"].value == pytest.approx(0.25)
    assert table["random"]["model_minus_baseline"].value == pytest.approx(0.5 - (1 / 2 + 1 / 3 + 1 / 4 + 1 / 4) / 4)
