"""Paired differences between two completions files on the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from grailcore.evaluation.baselines import fit_position_prior
from grailcore.evaluation.compare import main, paired_differences, per_row_scores
from grailcore.evaluation.completions_io import EvalSamples, write_completions
from grailcore.evaluation.fidelity import PROB_FLOOR, choice_fidelity
from grailcore.evaluation.rows import score_completions

from .helpers import completion
from .order_helpers import viewer_example

TRUE = (0.7, 0.2, 0.1)


def _row(i: int, viewer: str):
    return viewer_example(i, gold=1 + i % 2, n=3, viewer=viewer).replace(true_choice_probs=TRUE)


def _rows(n_viewers: int = 20, per_viewer: int = 2):
    return [_row(i, f"v{i // per_viewer}") for i in range(n_viewers * per_viewer)]


def _write(path, examples, answers_per_row):
    return write_completions(path, EvalSamples(examples, [[completion(a) for a in answers] for answers in answers_per_row]))


def test_per_row_scores_average_to_the_reported_fidelity():
    examples = _rows(5)
    scored = score_completions(examples, [[completion(a) for a in (1, 1, 2, "x")] for _ in examples])
    prior = fit_position_prior([1], [3], alpha=1.0, fitted_on="train")
    reported = choice_fidelity(scored, prior, alpha=1.0, plan=None)
    per_row = per_row_scores(scored, alpha=1.0)
    assert per_row["tv"].mean() == pytest.approx(reported["tv_choice"].value)
    assert per_row["nll"].mean() == pytest.approx(reported["nll"]["model"].value)


def test_a_model_sampling_the_truth_beats_a_position_habit_with_an_interval_excluding_zero(tmp_path):
    examples = _rows()
    truthful = _write(tmp_path / "a.jsonl", examples, [[1] * 7 + [2] * 2 + [3]] * len(examples))  # 0.7 / 0.2 / 0.1
    habit = _write(tmp_path / "b.jsonl", examples, [[3] * 10] * len(examples))
    diff = paired_differences(truthful, habit, alpha=0.0, n_boot=200, seed=0)
    # per row: TV(a) = 0, TV(b) = 0.9; so every replicate's difference is -0.9
    assert diff["tv"].value == pytest.approx(-0.9)
    assert diff["tv"].lo == pytest.approx(-0.9) and diff["tv"].hi == pytest.approx(-0.9)
    assert diff["acc"].value == pytest.approx((0.7 + 0.2) / 2)  # golds alternate 1, 2; b never right
    # b's smoothed-with-0 distribution never gives the gold any mass: its NLL is the floor's
    assert diff["nll"].value < np.log(PROB_FLOOR) + 1
    assert diff["parsed"].value == 0 and diff["acc_parsed"].value == pytest.approx((0.7 + 0.2) / 2)
    same = paired_differences(truthful, truthful, alpha=1.0, n_boot=50)
    assert same.pop("estimator") == "histogram_fallback"
    assert all(est.value == 0 and est.lo == 0 and est.hi == 0 for est in same.values())


def test_more_parsed_answers_at_the_same_hit_rate_raise_accuracy_but_not_accuracy_among_parsed(tmp_path):
    examples = _rows()  # golds alternate 1, 2
    # both pick option 1 when they answer (right on half the rows); A answers 8 of 10 draws, B 2 of 10
    a = _write(tmp_path / "a.jsonl", examples, [[1] * 8 + ["x"] * 2] * len(examples))
    b = _write(tmp_path / "b.jsonl", examples, [[1] * 2 + ["x"] * 8] * len(examples))
    diff = paired_differences(a, b, alpha=1.0, n_boot=200, seed=0)
    assert diff["parsed"].value == pytest.approx(0.6)
    assert diff["acc"].value == pytest.approx((0.8 - 0.2) / 2) and diff["acc"].lo > 0
    assert diff["acc_parsed"].value == pytest.approx(0.0) and diff["acc_parsed"].lo <= 0 <= diff["acc_parsed"].hi


def test_noise_that_cancels_between_models_gives_an_interval_around_zero(tmp_path):
    examples = _rows(40, 1)
    rng = np.random.default_rng(0)
    draws = [list(rng.choice([1, 2, 3], size=4, p=TRUE)) for _ in examples]
    a = _write(tmp_path / "a.jsonl", examples, draws)
    b = _write(tmp_path / "b.jsonl", examples, draws[1:] + draws[:1])  # same models, rows shuffled answers
    diff = paired_differences(a, b, alpha=1.0, n_boot=500)
    assert diff["tv"].lo < 0 < diff["tv"].hi


def test_different_rows_are_refused_with_the_row_named(tmp_path):
    examples = _rows(3)
    a = _write(tmp_path / "a.jsonl", examples, [[1]] * len(examples))
    moved = examples[:2] + [_row(99, "v9")] + examples[3:]
    b = _write(tmp_path / "b.jsonl", moved, [[1]] * len(moved))
    with pytest.raises(ValueError, match=r"row 3 differs: 'row2'.*'row99'"):
        paired_differences(a, b, alpha=1.0)
    # a side of several seeds: a seed on other rows is refused with its file named
    with pytest.raises(ValueError, match=r"row 3 differs: 'row2'.*'row99'.*b\.jsonl"):
        paired_differences([a, b], a, alpha=1.0)
    with pytest.raises(ValueError, match="names no completions file"):
        paired_differences("", a, alpha=1.0)
    with pytest.raises(ValueError, match="needs the same rows"):
        paired_differences(a, _write(tmp_path / "c.jsonl", examples[:4], [[1]] * 4), alpha=1.0)


def test_cli_prints_the_table(tmp_path, capsys):
    examples = _rows(10)
    a = _write(tmp_path / "a.jsonl", examples, [[1, 1, 2]] * len(examples))
    b = _write(tmp_path / "b.jsonl", examples, [[3, 3, 3]] * len(examples))
    diffs = main([str(a), str(b), "--n-boot", "100"])
    out = capsys.readouterr().out
    assert f"| tv | {diffs['tv'].value:+.4f} |" in out and out.count("| yes |") == 4  # tv, nll, acc, acc_parsed
    assert "| parsed | +0.0000 | [+0.0000, +0.0000] | no |" in out  # both always answer
    assert "| format | +0.0000 | [+0.0000, +0.0000] | no |" in out


def test_a_side_of_several_seeds_is_their_per_row_mean(tmp_path):
    """An arm run with two seeds against one baseline: the difference is the mean of the two
    seeds' differences (every score is a per-row mean), on one viewer bootstrap."""
    examples = _rows()
    rng = np.random.default_rng(1)
    seeds = [_write(tmp_path / f"a{s}.jsonl", examples, [list(rng.choice([1, 2, 3], size=4, p=TRUE)) for _ in examples])
             for s in range(2)]
    base = _write(tmp_path / "b.jsonl", examples, [[3, 3, 1, "x"]] * len(examples))
    both = paired_differences(seeds, base, alpha=1.0, n_boot=200)
    each = [paired_differences(s, base, alpha=1.0, n_boot=200) for s in seeds]
    for name in ("tv", "nll", "off_slate", "acc", "parsed", "format"):
        assert both[name].value == pytest.approx((each[0][name].value + each[1][name].value) / 2), name
    assert each[0]["tv"].value != pytest.approx(each[1]["tv"].value)  # the seeds differ: a real mean
    # the CLI takes a side as comma-separated paths
    cli = main([f"{seeds[0]},{seeds[1]}", str(base), "--n-boot", "200"])
    assert cli["tv"].value == pytest.approx(both["tv"].value)

