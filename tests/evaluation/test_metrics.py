"""Choice/opinion metrics and breakdowns on rows built from real completion texts."""

import numpy as np
import pytest

from grailcore.evaluation.evaluate import EvalOptions, evaluate, evaluate_examples
from grailcore.evaluation.metrics import macro_f1, position_confusion
from grailcore.evaluation.rows import NONE, score_completions

from .helpers import completion, example

EXAMPLES = [
    example(0, 2, 2, viewer="a", opinion="increase", issue="gun_control", study="study1"),
    example(1, 1, 3, viewer="a", opinion="no_change", issue="gun_control", study="study1"),
    example(2, 3, 3, viewer="b", opinion="decrease", issue="minimum_wage", study="study2"),
    example(3, 4, 4, viewer="c", opinion="no_change", issue="minimum_wage", study="study3"),
]
COMPLETIONS = [
    [completion(2, "increase"), completion(1, "increase")],  # right first, then wrong
    [completion(1, "decrease"), completion(1, "no_change")],  # right twice
    [completion(7, "decrease"), completion(3, "decrease")],  # 7 is out of range: unparsed
    ["<answer>4</answer> I think", completion(4, "no_change")],  # original rule right, strict format broken
]


def test_strict_parse_original_rule_and_rates():
    rows = score_completions(EXAMPLES, COMPLETIONS)
    assert rows.first_answer.tolist() == [2, 1, NONE, 4]
    assert rows.original_answers[:, 0].tolist() == [2, 1, 7, 4]
    res = evaluate(EXAMPLES, COMPLETIONS, options=EvalOptions(n_boot=0))
    choice = res["choice"]
    assert choice["accuracy"].value == pytest.approx(3 / 4)
    assert choice["accuracy_sample_mean"].value == pytest.approx((1 / 2 + 1 + 1 / 2 + 1) / 4)
    assert choice["parsed_rate"].value == pytest.approx(7 / 8)
    assert choice["format_rate"].value == pytest.approx(6 / 8)  # row 2 sample 0 and row 3 sample 0 fail
    assert choice["original_accuracy"].value == pytest.approx(3 / 4)
    assert choice["original_format_rate"].value == pytest.approx(1.0)


def test_original_rule_is_scored_apart_from_the_strict_parse():
    examples = [example(0, 2, 3), example(1, 1, 3)]
    completions = [["<answer>Option 2</answer>"], [completion(1)]]  # 'Option 2': only the original reads it
    choice = evaluate(examples, completions, options=EvalOptions(n_boot=0))["choice"]
    assert (choice["accuracy"].value, choice["parsed_rate"].value) == (0.5, 0.5)
    assert (choice["original_accuracy"].value, choice["original_parsed_rate"].value) == (1.0, 1.0)


def test_breakdowns_by_group():
    res = evaluate(EXAMPLES, COMPLETIONS, options=EvalOptions(n_boot=0))
    by = res["breakdowns"]
    assert list(by["n_options"]) == ["2", "3", "4"]
    assert by["n_options"]["3"]["n_rows"] == 2 and by["n_options"]["3"]["accuracy"].value == 0.5
    assert by["issue"]["minimum_wage"]["accuracy"].value == 0.5
    assert by["study"]["study2"]["accuracy"].value == 0.0
    assert by["gold_position"]["4"]["accuracy"].value == 1.0
    assert by["gold_position"]["3"]["parsed_rate"].value == 0.5


def test_macro_f1_by_hand():
    gold = np.array([0, 0, 1, 2])
    pred = np.array([0, 1, 1, NONE])
    # class 0: P 1, R 1/2 -> 2/3; class 1: P 1/2, R 1 -> 2/3; class 2: no prediction -> 0
    assert macro_f1(gold, pred, 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == pytest.approx(1.0)  # absent classes skipped


def test_opinion_metrics_and_confusions():
    res = evaluate(EXAMPLES, COMPLETIONS, options=EvalOptions(n_boot=0))
    # first-sample opinions: increase (right), decrease (wrong), decrease (right), none (wrong)
    assert res["opinion"]["accuracy"].value == pytest.approx(0.5)
    expected_f1 = np.mean([1.0, 2 / 3, 0.0])  # increase, decrease (P 1/2 R 1), no_change
    assert res["opinion"]["macro_f1"].value == pytest.approx(expected_f1)
    opinion = np.array(res["confusion"]["opinion"])
    assert opinion.shape == (3, 4) and opinion[2, 3] == 1 and opinion[2, 1] == 1
    positions = position_confusion(score_completions(EXAMPLES, COMPLETIONS))
    assert positions.shape == (4, 5) and positions[2, 4] == 1 and positions[3, 3] == 1


def test_flat_trainer_metrics():
    flat = evaluate_examples(EXAMPLES, COMPLETIONS, train_examples=EXAMPLES[:2])
    assert flat["eval/accuracy"] == pytest.approx(3 / 4)
    assert flat["eval/opinion_accuracy"] == pytest.approx(0.5)
    assert {"eval/parsed_rate", "eval/format_rate", "eval/opinion_macro_f1", "eval/tv_position_histogram",
            "eval/nll_choice/model", "eval/ece", "eval/baseline/random"} <= set(flat)
    assert "eval/tv_choice" not in flat  # not synthetic: no true probabilities
    assert all(isinstance(v, float) for v in flat.values())


def test_misaligned_or_empty_inputs_fail_loudly():
    with pytest.raises(ValueError, match="align"):
        evaluate(EXAMPLES, COMPLETIONS[:2])
    with pytest.raises(ValueError, match="no completions"):
        evaluate(EXAMPLES[:1], [[]])
