"""TV, NLL, calibration and opinion-distribution fidelity on hand-computed values."""

import numpy as np
import pytest

from grailcore.evaluation import fidelity as fd
from grailcore.evaluation.answer_slot import EXACT, RowSlots, SampleSlots
from grailcore.evaluation.baselines import fit_position_prior
from grailcore.evaluation.rows import NONE, build_rows

from .helpers import example


def test_total_variation_and_smoothing_by_hand():
    assert fd.total_variation(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert fd.total_variation(np.array([0.2, 0.3, 0.5]), np.array([0.2, 0.3, 0.5])) == 0.0
    probs = fd.smoothed_probs(np.array([[2.0, 0, 0], [0, 0, 0]]), np.array([3, 2]), alpha=1.0)
    np.testing.assert_allclose(probs, [[3 / 5, 1 / 5, 1 / 5], [0.5, 0.5, 0.0]])
    # alpha 0 and nothing parsed -> uniform over the row's own options
    np.testing.assert_allclose(fd.smoothed_probs(np.zeros((1, 3)), np.array([2]), 0.0), [[0.5, 0.5, 0.0]])


def test_gold_nll_by_hand():
    probs = np.array([[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(fd.gold_nll(probs, np.array([2, 1])), [-np.log(0.75), np.log(2)])


def test_perfectly_calibrated_fake_has_near_zero_ece_and_a_biased_one_does_not():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.05, 1.0, size=20000)
    calibrated = (rng.uniform(size=confidence.size) < confidence).astype(float)
    overconfident = (rng.uniform(size=confidence.size) < confidence / 2).astype(float)
    ece, bins = fd.expected_calibration_error(confidence, calibrated, n_bins=10)
    assert ece < 0.02
    assert all(abs(b["accuracy"] - b["confidence"]) < 0.05 for b in bins)
    assert fd.expected_calibration_error(confidence, overconfident)[0] > 0.2


def test_ece_by_hand():
    # bin 0.9: acc 0.5 vs conf 0.9 (gap 0.4, half the rows); bin 0.2: acc 0 vs 0.2 (gap 0.2)
    ece, bins = fd.expected_calibration_error(np.array([0.9, 0.9, 0.2, 0.2]), np.array([1.0, 0, 0, 0]))
    assert ece == pytest.approx(0.3)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(2.0, 0.0), (2.0, 0.5)]


def test_choice_fidelity_on_hand_values():
    examples = [example(0, 1, 2, true_probs=(0.5, 0.5)), example(1, 2, 2, true_probs=(1.0, 0.0))]
    # row 0 samples: 1, 1, 1, 2 ; row 1 samples: 2, unparsed, 2, 2
    rows = build_rows(examples, [[1, 1, 1, 2], [2, NONE, 2, 2]])
    prior = fit_position_prior([1, 1, 1], [2, 2, 2], alpha=1.0, fitted_on="train")  # [0.8, 0.2]
    out = fd.choice_fidelity(rows, prior, alpha=1.0, plan=None)
    # alpha 1: row 0 -> [4/6, 2/6], row 1 -> [1/5, 4/5]
    assert out["tv_choice"].value == pytest.approx((abs(4 / 6 - 0.5) + 0.8) / 2)
    assert out["nll"]["model"].value == pytest.approx((-np.log(4 / 6) - np.log(4 / 5)) / 2)
    assert out["nll"]["uniform"].value == pytest.approx(np.log(2))
    assert out["nll"]["position_prior"].value == pytest.approx((-np.log(0.8) - np.log(0.2)) / 2)
    assert out["nll"]["true"].value > 10  # the truth gave the gold of row 1 probability 0
    assert out["unparsed_sample_share"] == pytest.approx(1 / 8)
    # model histogram: row 0 [3/4, 1/4, 0], row 1 [0, 3/4, 1/4 unparsed]; gold [1/2, 1/2, 0]
    np.testing.assert_allclose(out["position_histogram"]["model"], [3 / 8, 4 / 8, 1 / 8])
    assert out["tv_position_histogram"].value == pytest.approx(1 / 8)
    # top choices 1 (conf 4/6, right) and 2 (conf 4/5, right)
    assert out["ece"].value == pytest.approx(((1 - 4 / 6) + (1 - 4 / 5)) / 2)
    assert 0 < out["tv_choice_sampling_floor"] < out["tv_choice"].value


def test_sampling_floor_shrinks_with_more_samples():
    true = np.array([[0.6, 0.3, 0.1]] * 50)
    n = np.full(50, 3)
    few, many = fd.sampling_floor_tv(true, n, k=2, alpha=0.0), fd.sampling_floor_tv(true, n, k=400, alpha=0.0)
    assert many.mean() < 0.05 < few.mean()


def test_opinion_fidelity_against_gold_and_constant_no_change():
    examples = [example(i, 1, 2, opinion=o) for i, o in enumerate(["increase", "no_change", "no_change", None])]
    opinions = [[0], [2], [0], [1]]  # increase, no_change, increase, decrease (row 3 has no gold)
    rows = build_rows(examples, [[1]] * 4, opinions=opinions)
    out = fd.opinion_fidelity(rows, alpha=1.0, plan=None)
    np.testing.assert_allclose(out["gold_distribution"], [1 / 3, 0, 2 / 3, 0])
    np.testing.assert_allclose(out["model_distribution"], [2 / 3, 0, 1 / 3, 0])
    assert out["tv_model"].value == pytest.approx(1 / 3)
    assert out["tv_always_no_change"] == pytest.approx(1 / 3)
    assert fd.opinion_fidelity(build_rows([example(0, 1, 2)], [[1]]), 1.0, None) is None


def test_histograms_follow_bootstrap_row_weights():
    examples = [example(0, 1, 2, opinion="increase"), example(1, 2, 2, opinion="decrease")]
    rows = build_rows(examples, [[1], [1]], opinions=[[0], [0]])
    dropped_second = np.array([2.0, 0.0])  # a replicate that drew row 0 twice and row 1 never
    model, gold = fd.position_histograms(rows, dropped_second)
    np.testing.assert_allclose(model, [1, 0, 0])
    np.testing.assert_allclose(gold, [1, 0, 0])
    model, gold = fd.opinion_histograms(rows, dropped_second)
    np.testing.assert_allclose(gold, [1, 0, 0, 0])


def test_ece_splits_ties_without_favouring_a_position():
    # two rows whose top options tie (0.4, 0.4, 0.2): gold 1 and gold 2. Breaking ties toward
    # option 1 would call the first right and the second wrong; a uniform tie-break is half right on both.
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    confidence, correct = fd.top_choice(probs, np.array([1, 2, 3]))
    np.testing.assert_allclose(confidence, [0.4, 0.4, 0.5])
    np.testing.assert_allclose(correct, [0.5, 0.5, 1.0])
    # through the metric: a histogram row 1,2 ties at k = 2 whichever option is gold
    examples = [example(0, 1, 3), example(1, 2, 3)]
    rows = build_rows(examples, [[1, 2], [1, 2]])
    out = fd.choice_fidelity(rows, fit_position_prior([1], [3], 1.0, "t"), alpha=0.0, plan=None)
    assert out["reliability"][0]["accuracy"] == pytest.approx(0.5)


def test_sampling_floor_uses_each_rows_parsed_samples():
    true = np.array([[0.6, 0.3, 0.1]] * 200)
    n = np.full(200, 3)
    per_row = fd.sampling_floor_tv(true, n, k=np.array([1] * 100 + [16] * 100), alpha=0.0)
    assert per_row[:100].mean() > 2 * per_row[100:].mean()
    # a row whose 4 samples are all unparsed rests on 0 draws: its floor is the uniform's TV, not k = 4's
    examples = [example(0, 1, 3, true_probs=(0.6, 0.3, 0.1)), example(1, 1, 3, true_probs=(0.6, 0.3, 0.1))]
    rows = build_rows(examples, [[1, 1, 2, 1], [NONE] * 4])
    floor = fd.choice_fidelity(rows, fit_position_prior([1], [3], 1.0, "t"), alpha=1.0, plan=None)[
        "tv_choice_sampling_floor"]
    uniform_tv = 0.5 * (abs(0.6 - 1 / 3) + abs(0.3 - 1 / 3) + abs(0.1 - 1 / 3))
    four_draws = fd.sampling_floor_tv(true[:1], n[:1], k=4, alpha=1.0, repeats=400).mean()
    assert floor == pytest.approx((uniform_tv + four_draws) / 2, abs=0.03)


def _slots(per_sample: list[list[tuple]], opinions: tuple = (0.2, 0.3, 0.4)) -> list[RowSlots]:
    return [RowSlots(EXACT, 1.0, tuple(SampleSlots(p, opinions, "sampled", "sampled") for p in row))
            for row in per_sample]


def test_exact_distributions_drive_every_choice_measure_by_hand():
    examples = [example(0, 1, 2, true_probs=(0.5, 0.5), opinion="no_change"),
                example(1, 2, 2, true_probs=(1.0, 0.0), opinion="increase")]
    # row 0: two completions (0.6, 0.2) and (0.2, 0.6) -> mean (0.4, 0.4), off-slate 0.2
    # row 1: one completion (0.1, 0.9), off-slate 0; the sampled answers disagree with both (ignored)
    slots = _slots([[(0.6, 0.2), (0.2, 0.6)], [(0.1, 0.9)]])
    rows = build_rows(examples, [[2, 2], [1]], slots=slots)
    out = fd.choice_fidelity(rows, fit_position_prior([1], [2], 1.0, "t"), alpha=1.0, plan=None)
    assert out["estimator"] == EXACT and "smoothing_alpha" not in out and "tv_choice_sampling_floor" not in out
    assert out["nll"]["model"].value == pytest.approx((-np.log(0.4) - np.log(0.9)) / 2)
    # TV with the off-slate bin: row 0 0.5 (0.1 + 0.1 + 0.2), row 1 0.5 (0.9 + 0.9 + 0)
    assert out["tv_choice"].value == pytest.approx((0.2 + 0.9) / 2)
    np.testing.assert_allclose(out["position_histogram"]["model"], [0.25, 0.65, 0.1])
    assert out["answer_slot"]["off_slate_mass"].value == pytest.approx(0.1)
    assert out["answer_slot"]["forced_slot_share"] == 0.0
    # calibration: row 0 ties 0.4 / 0.4 (gold 1: half right), row 1 top 0.9 (gold 2: right)
    assert out["ece"].value == pytest.approx((abs(0.5 - 0.4) + abs(1.0 - 0.9)) / 2)
    opinion = fd.opinion_fidelity(rows, alpha=1.0, plan=None)
    assert opinion["estimator"] == EXACT
    np.testing.assert_allclose(opinion["model_distribution"], [0.2, 0.3, 0.4, 0.1])
    assert opinion["nll_model"].value == pytest.approx((-np.log(0.4) - np.log(0.2)) / 2)


def test_an_off_slate_model_cannot_win_by_not_answering():
    examples = [example(i, 1, 3, true_probs=(0.5, 0.3, 0.2)) for i in range(4)]
    honest = build_rows(examples, [[1]] * 4, slots=_slots([[(0.5, 0.3, 0.2)]] * 4))
    silent = build_rows(examples, [[NONE]] * 4, slots=_slots([[(0.05, 0.03, 0.02)]] * 4))  # 90% off-slate
    prior = fit_position_prior([1], [3], 1.0, "t")
    a, b = (fd.choice_fidelity(r, prior, 1.0, None) for r in (honest, silent))
    assert a["tv_choice"].value == 0 and b["tv_choice"].value == pytest.approx(0.9)
    assert b["nll"]["model"].value == pytest.approx(a["nll"]["model"].value + np.log(10))
